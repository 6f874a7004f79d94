//! Metrics structs as plain words: every struct the workers count into is `#[repr(C)]` and made only of
//! its word type `W` — `AtomicU64` in shared memory, `u64` in a snapshot — so a snapshot is a word-by-word
//! copy and folding a dead worker into the totals a word-by-word sum. This module is the only place that
//! views such a struct as a slice of words (the unsafe part), and `word_struct!` the only way to declare
//! one: it checks at compile time that the struct is nothing but words.

use std::sync::atomic::{AtomicU64, Ordering};

/// A word of a metrics struct: `u64` in a snapshot, `AtomicU64` in shared memory (same size and alignment).
pub trait Word: sealed::Sealed {}
impl Word for u64 {}
impl Word for AtomicU64 {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for u64 {}
    impl Sealed for std::sync::atomic::AtomicU64 {}
}

/// A struct that is nothing but words: `#[repr(C)]`, every field a `W` or an array or struct of them.
///
/// # Safety
/// Implement only for such types — through `word_struct!`, which checks it: then there is no padding,
/// all-zero bytes are a valid value, and the value can be viewed as a slice of `u64` or `AtomicU64`.
pub unsafe trait Words {}

fn words<T: Words, W: Word>(value: &T) -> &[W] {
    // SAFETY: `T: Words` is words only, `W` is one of the two word types (same size and alignment as u64).
    unsafe {
        std::slice::from_raw_parts(
            std::ptr::from_ref(value).cast::<W>(),
            std::mem::size_of::<T>() / std::mem::size_of::<W>(),
        )
    }
}

fn words_mut<T: Words>(value: &mut T) -> &mut [u64] {
    // SAFETY: as in `words`; the borrow is exclusive.
    unsafe {
        std::slice::from_raw_parts_mut(
            std::ptr::from_mut(value).cast::<u64>(),
            std::mem::size_of::<T>() / std::mem::size_of::<u64>(),
        )
    }
}

/// A zeroed value on the heap (these are tens of kilobytes: too big for comfort on a stack).
pub fn zeroed<T: Words>() -> Box<T> {
    let layout = std::alloc::Layout::new::<T>();
    // SAFETY: `T: Words` is never zero-sized (it holds at least one word).
    let memory = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if memory.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: allocated with `T`'s layout by the global allocator, as `Box` expects, and all-zero bytes are a
    // valid `T: Words`.
    unsafe { Box::from_raw(memory) }
}

/// Adds `live`, read atomically word by word, into `total` (the same struct with plain words).
pub fn add_into<Total: Words, Live: Words>(total: &mut Total, live: &Live) {
    assert_eq!(std::mem::size_of::<Total>(), std::mem::size_of::<Live>(), "the same layout");
    let live: &[AtomicU64] = words(live);
    for (total, live) in words_mut(total).iter_mut().zip(live) {
        *total = total.wrapping_add(live.load(Ordering::Relaxed));
    }
}

/// Stores zero in every word.
pub fn reset<T: Words>(live: &T) {
    for word in words::<T, AtomicU64>(live) {
        word.store(0, Ordering::Relaxed);
    }
}

/// Declares a metrics struct generic over its word type `W` and implements [`Words`] for it, after
/// checking, at compile time, that it is nothing but words: every field 8-byte aligned (a `W`, an array of
/// them, or another such struct), the fields' sizes adding up to the struct's (no padding), and the `u64`
/// and `AtomicU64` versions the same size.
macro_rules! word_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident<W> {
            $( $(#[$field_meta:meta])* pub $field:ident: $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        pub struct $name<W> {
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        // SAFETY: `#[repr(C)]` and, as checked below, made of 8-byte-aligned fields whose sizes add up to
        // the struct's: no padding, and every field a word, an array of words or another `Words` struct.
        unsafe impl<W: $crate::metrics::words::Word> $crate::metrics::words::Words for $name<W> {}

        const _: () = {
            // The field types, with `W` a plain word.
            #[allow(dead_code)]
            type W = u64;
            assert!(std::mem::size_of::<$name<u64>>() == 0 $( + std::mem::size_of::<$ty>() )*, "padding");
            $( assert!(std::mem::align_of::<$ty>() == std::mem::align_of::<u64>(), "a field that is not words"); )*
            assert!(std::mem::size_of::<$name<u64>>() == std::mem::size_of::<$name<std::sync::atomic::AtomicU64>>());
            assert!(std::mem::align_of::<$name<std::sync::atomic::AtomicU64>>() == std::mem::align_of::<u64>());
        };
    };
}
pub(crate) use word_struct;
