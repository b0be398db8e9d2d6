//! What the pool synchronises with: the standard library's types, or loom's
//! under `--cfg loom`, with one cell API for both (loom's `with`/`with_mut`,
//! which let loom see every access to the cell the closure is handed over in).

#[cfg(loom)]
pub(crate) use loom::{
    cell::UnsafeCell,
    hint,
    sync::{atomic, Arc, Condvar, Mutex},
    thread,
};
#[cfg(not(loom))]
pub(crate) use std::{
    hint,
    sync::{atomic, Arc, Condvar, Mutex},
    thread,
};

/// `std::cell::UnsafeCell` behind loom's access API.
#[cfg(not(loom))]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(std::cell::UnsafeCell::new(value))
    }

    /// Reads through the pointer `f` is given; the caller rules out a concurrent write.
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    /// Writes through the pointer `f` is given; the caller rules out any concurrent access.
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}
