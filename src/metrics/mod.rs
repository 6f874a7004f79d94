//! Metrics: what the master reads and exports for Prometheus.

pub mod listen_queue;
