//! The one way Weir spawns tasks: named, logged, aborted when the handle drops. (Dataflows run
//! on threads of their own, see `runtime.rs`.)

use std::future::Future;

/// A spawned task that is aborted when this handle is dropped, so no task
/// outlives its owner.
#[derive(Debug)]
pub struct TaskHandle {
    name: &'static str,
    handle: tokio::task::JoinHandle<()>,
}

impl TaskHandle {
    /// Spawns `future` as task `name`.
    pub fn spawn(name: &'static str, future: impl Future<Output = ()> + Send + 'static) -> Self {
        tracing::debug!(task = name, "spawning task");
        TaskHandle {
            name,
            handle: tokio::spawn(future),
        }
    }

    pub fn abort(&self) {
        tracing::debug!(task = self.name, "aborting task");
        self.handle.abort();
    }
}

impl Drop for TaskHandle {
    fn drop(&mut self) {
        self.handle.abort();
    }
}
