//! The shared-memory region of worker cells: the master creates it (a memfd) before starting any worker, and
//! hands each worker the descriptor and the number of its cell. The worker counts in its cell with relaxed
//! atomic adds — no system call, lock or message per request — and the master reads the cells when scraped.
//!
//! A cell outlives its worker: when a worker exits, the master adds its counters into the totals of the
//! dead ([`Cells::release`]), then zeroes the cell for the next worker, so counters never go backwards.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use std::sync::atomic::{AtomicU64, Ordering};

use super::layout::{Counters, WorkerCell};
use super::words;

/// Cells per `--processes`: a worker and its replacement overlap during a reload or a recycle, and a
/// harakiri'd worker still holds its cell while its replacement starts (and may itself be reloaded). A
/// worker that finds no free cell serves uncounted (logged); cells not in use cost only address space.
pub const CELLS_PER_WORKER: usize = 4;

pub(super) type LiveCell = WorkerCell<AtomicU64>;

/// The mapped region: `len` cells, shared with every worker.
pub struct Region {
    fd: OwnedFd,
    cells: NonNull<LiveCell>,
    len: usize,
}

// SAFETY: the mapping is only ever accessed through atomics (`LiveCell` is words of `AtomicU64`).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// A new region of `len` zeroed cells.
    pub fn create(len: usize) -> io::Result<Self> {
        let file = File::from(memfd_create(c"oxwsgi-metrics", MFdFlags::MFD_CLOEXEC)?);
        let bytes = len.checked_mul(size_of::<LiveCell>()).ok_or(io::ErrorKind::InvalidInput)?;
        // A memfd grows with zeroed pages.
        file.set_len(u64::try_from(bytes).map_err(|_| io::ErrorKind::InvalidInput)?)?;
        Self::map(file.into(), len)
    }

    /// Maps the region a master created, from its inherited descriptor (checked: its size must be whole
    /// cells).
    pub fn inherit(fd: OwnedFd) -> io::Result<Self> {
        let file = File::from(fd);
        let bytes = usize::try_from(file.metadata()?.len()).map_err(|_| io::ErrorKind::InvalidData)?;
        if bytes == 0 || bytes % size_of::<LiveCell>() != 0 {
            // Another build of oxwsgi made it (the cell layout differs): counting into it would corrupt it.
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the metrics region has another layout"));
        }
        // Close-on-exec from now on, so the app's subprocesses do not inherit it.
        fcntl(&file, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        Self::map(file.into(), bytes / size_of::<LiveCell>())
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<Self> {
        let bytes = len * size_of::<LiveCell>();
        // SAFETY: a fresh shared mapping of the whole file, which is `bytes` long.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let cells = NonNull::new(address.cast::<LiveCell>()).ok_or(io::ErrorKind::AddrNotAvailable)?;
        Ok(Self { fd, cells, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The descriptor to hand to workers.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Cell `index`; `None` past the end.
    pub fn cell(&self, index: usize) -> Option<&LiveCell> {
        // SAFETY: in bounds; the mapping lives as long as `self`, is page-aligned (so aligned for u64) and
        // every bit pattern is a valid `LiveCell`.
        (index < self.len).then(|| unsafe { &*self.cells.as_ptr().add(index) })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped; no reference into it outlives `self`.
        unsafe { libc::munmap(self.cells.as_ptr().cast(), self.len * size_of::<LiveCell>()) };
    }
}

/// The master's bookkeeping of which cells are in use, and the totals of the workers that died.
pub struct Cells {
    region: Region,
    in_use: Vec<bool>,
    retired: Box<Counters<u64>>,
}

impl Cells {
    pub fn new(region: Region) -> Self {
        let in_use = vec![false; region.len()];
        Self { region, in_use, retired: words::zeroed() }
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    /// A free cell for a new worker, if any.
    pub fn assign(&mut self) -> Option<usize> {
        let index = self.in_use.iter().position(|used| !used)?;
        self.in_use[index] = true;
        Some(index)
    }

    /// The worker of cell `index` has exited (it writes no more): its counters join the totals, and the
    /// cell is zeroed for the next worker.
    pub fn release(&mut self, index: usize) {
        let Some(cell) = self.region.cell(index) else { return };
        if !std::mem::replace(&mut self.in_use[index], false) {
            return;
        }
        words::add_into(&mut *self.retired, &cell.counters);
        words::reset(cell);
    }

    /// Every counter so far: the dead workers' totals plus the live cells.
    pub fn counters(&self) -> Box<Counters<u64>> {
        let mut total = words::zeroed::<Counters<u64>>();
        words::add_into(&mut *total, &*self.retired);
        for cell in self.live() {
            words::add_into(&mut *total, &cell.counters);
        }
        total
    }

    /// One live cell's counters and gauges, read now.
    pub fn snapshot(&self, index: usize) -> Option<Box<WorkerCell<u64>>> {
        let cell = self.region.cell(index).filter(|_| self.in_use[index])?;
        let mut snapshot = words::zeroed::<WorkerCell<u64>>();
        words::add_into(&mut *snapshot, cell);
        Some(snapshot)
    }

    /// The sum of the live workers' gauges: (in flight, threads, busy threads).
    pub fn gauges(&self) -> (u64, u64, u64) {
        self.live().fold((0, 0, 0), |(in_flight, threads, busy), cell| {
            let gauges = &cell.gauges;
            (
                in_flight + gauges.in_flight.load(Ordering::Relaxed),
                threads + gauges.threads.load(Ordering::Relaxed),
                busy + gauges.busy_threads.load(Ordering::Relaxed),
            )
        })
    }

    fn live(&self) -> impl Iterator<Item = &LiveCell> {
        self.in_use.iter().enumerate().filter(|(_, used)| **used).filter_map(|(i, _)| self.region.cell(i))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::model::{Method, ProtocolErrorKind};
    use crate::metrics::{Recorder, RequestDone};

    #[test]
    fn a_dead_workers_counts_stay_in_the_totals() {
        let mut cells = Cells::new(Region::create(2).unwrap());
        let first = cells.assign().unwrap();
        let worker = Recorder::of_cell(cells.region().cell(first).map(|c| {
            // SAFETY: (a test) the region outlives every use below.
            unsafe { &*std::ptr::from_ref(c) }
        }));
        let done = RequestDone {
            method: Method::Get,
            status: 200,
            duration: Duration::from_millis(3),
            body_bytes: 5,
            response_bytes: 100,
            write_failed: false,
        };
        worker.request_done(&done);
        worker.request_done(&done);
        let in_flight = worker.in_flight();
        assert_eq!(cells.gauges().0, 1);
        assert_eq!(cells.counters().total_requests(), 2);
        cells.release(first);
        assert_eq!(cells.counters().total_requests(), 2, "folded, not lost");
        assert_eq!(cells.counters().request_duration.count(), 2);
        assert_eq!(cells.gauges().0, 0, "a dead worker has nothing in flight");
        // The next worker in the same cell starts from zero; the totals keep growing.
        assert_eq!(cells.assign(), Some(first));
        worker.request_done(&done);
        assert_eq!(cells.counters().total_requests(), 3);
        assert_eq!(cells.snapshot(first).unwrap().counters.total_requests(), 1);
        // Outside the counted statuses (the server refuses them anyway): timed, not counted as another.
        worker.request_done(&RequestDone { status: 150, ..done });
        worker.request_done(&RequestDone { status: 1000, ..done });
        assert_eq!(cells.counters().total_requests(), 3);
        assert_eq!(cells.counters().request_duration.count(), 5);
        std::mem::forget(in_flight);
    }

    #[test]
    fn cells_run_out_then_come_back() {
        let mut cells = Cells::new(Region::create(1).unwrap());
        assert_eq!(cells.assign(), Some(0));
        assert_eq!(cells.assign(), None);
        cells.release(0);
        cells.release(0); // twice: no double counting
        assert_eq!(cells.assign(), Some(0));
    }

    #[test]
    fn an_inherited_region_shares_the_cells() {
        let region = Region::create(3).unwrap();
        let copy = region.fd().try_clone_to_owned().unwrap();
        let worker = Recorder::new(Region::inherit(copy).unwrap(), 2).unwrap();
        worker.protocol_error(ProtocolErrorKind::PlainHttp);
        let seen = region.cell(2).unwrap().counters.protocol_errors[ProtocolErrorKind::PlainHttp as usize]
            .load(Ordering::Relaxed);
        assert_eq!(seen, 1);
        let copy = region.fd().try_clone_to_owned().unwrap();
        assert!(Recorder::new(Region::inherit(copy).unwrap(), 3).is_err());
    }
}
