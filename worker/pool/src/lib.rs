//! The forward pass's thread pool: a fixed set of threads that run one closure
//! together (the caller is thread 0) and meet at spin barriers between its
//! phases, so a whole forward pass is one dispatch instead of one per matmul.
//! Threads spin briefly for the next dispatch, then sleep on a condition
//! variable; a panic on any thread is re-raised on the caller once every
//! thread has left the closure.
//!
//! Built with `--cfg loom`, every atomic, lock, thread and the cell that hands
//! the closure over come from loom ([`sync`]), and the tests in `loom_tests`
//! check the dispatch, the barrier, sleeping, panics and shutdown under every
//! interleaving loom reaches (`scripts/test.sh`, stage `loom`).

mod sync;

use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use sync::{hint, thread, Arc, Condvar, Mutex, UnsafeCell};

/// Spins before a waiting thread yields its core (barrier) or sleeps (between
/// dispatches). Under loom each spin is a scheduling point: two are enough to
/// reach both the spinning and the sleeping paths.
const SPINS: usize = if cfg!(loom) { 2 } else { 1 << 14 };

type Job = *const (dyn Fn(&Worker<'_>) + Sync);

struct Inner {
    threads: usize,
    /// Bumped once per dispatch; threads run the job when it moves.
    generation: AtomicUsize,
    /// The closure of the current dispatch (valid while `run` waits for `finished`).
    job: UnsafeCell<Option<Job>>,
    finished: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    barrier_count: AtomicUsize,
    barrier_phase: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by `run` before it bumps `generation` (with
// Release) and read by threads only after they observe the bump (with
// Acquire); `run` does not return, so the closure stays alive, until every
// thread has counted itself in `finished`.
unsafe impl Sync for Inner {}
unsafe impl Send for Inner {}

pub struct Pool {
    inner: Arc<Inner>,
    handles: Vec<thread::JoinHandle<()>>,
    /// One dispatch at a time.
    running: Mutex<()>,
}

/// One thread's view of a dispatch.
pub struct Worker<'a> {
    pub index: usize,
    pub count: usize,
    inner: &'a Inner,
}

impl Worker<'_> {
    /// Waits until every thread of the pool reaches this point.
    ///
    /// # Panics
    /// When another thread of the dispatch panicked (so none waits forever).
    pub fn barrier(&self) {
        if self.count == 1 {
            return;
        }
        let inner = self.inner;
        let phase = inner.barrier_phase.load(Ordering::Acquire);
        if inner.barrier_count.fetch_add(1, Ordering::AcqRel) + 1 == self.count {
            inner.barrier_count.store(0, Ordering::Relaxed);
            inner.barrier_phase.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0usize;
        while inner.barrier_phase.load(Ordering::Acquire) == phase {
            if inner.panicked.load(Ordering::Relaxed) {
                panic!("another thread of the forward pass panicked");
            }
            spins += 1;
            if spins.is_multiple_of(SPINS) {
                thread::yield_now();
            } else {
                hint::spin_loop();
            }
        }
    }

    /// This thread's share of `0..n`, in contiguous pieces that are multiples
    /// of `align` (the last piece takes the remainder).
    pub fn share(&self, n: usize, align: usize) -> Range<usize> {
        share(n, align, self.index, self.count)
    }
}

/// Piece `index` of `count` of `0..n`, piece boundaries on multiples of `align`.
pub fn share(n: usize, align: usize, index: usize, count: usize) -> Range<usize> {
    let units = n.div_ceil(align.max(1));
    let (base, extra) = (units / count, units % count);
    let start = index * base + index.min(extra);
    let end = start + base + usize::from(index < extra);
    (start * align).min(n)..(end * align).min(n)
}

impl Pool {
    /// A pool of `threads` threads, the caller of [`Pool::run`] among them.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let inner = Arc::new(Inner {
            threads,
            generation: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            finished: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            barrier_count: AtomicUsize::new(0),
            barrier_phase: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        });
        let handles = (1..threads)
            .map(|index| {
                let inner = inner.clone();
                thread::Builder::new().name(format!("kandle-compute-{index}")).spawn(move || serve(&inner, index))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self { inner, handles, running: Mutex::new(()) })
    }

    pub fn threads(&self) -> usize {
        self.inner.threads
    }

    /// Runs `f` on every thread of the pool and returns when all are done.
    pub fn run(&self, f: &(dyn Fn(&Worker<'_>) + Sync)) {
        let inner = &*self.inner;
        let caller = Worker { index: 0, count: inner.threads, inner };
        if inner.threads == 1 {
            return f(&caller);
        }
        let one_at_a_time = self.running.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: no thread reads `job` until `generation` moves below, and the
        // previous dispatch's threads have all finished (we waited for them).
        // The lifetime is erased; `f` outlives its use because this function
        // waits for every thread before returning.
        let job = unsafe { std::mem::transmute::<&(dyn Fn(&Worker<'_>) + Sync), Job>(f) };
        // SAFETY: as above, no thread reads the cell while it is written.
        inner.job.with_mut(|cell| unsafe { *cell = Some(job) });
        inner.finished.store(0, Ordering::Relaxed);
        inner.panicked.store(false, Ordering::Relaxed);
        // A panicking dispatch can leave a barrier half counted.
        inner.barrier_count.store(0, Ordering::Relaxed);
        inner.generation.fetch_add(1, Ordering::Release);
        {
            let _guard = inner.sleep.lock().unwrap_or_else(|e| e.into_inner());
            inner.wake.notify_all();
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| f(&caller)));
        if outcome.is_err() {
            inner.panicked.store(true, Ordering::Relaxed);
        }
        let mut spins = 0usize;
        while inner.finished.load(Ordering::Acquire) < inner.threads - 1 {
            spins += 1;
            if spins.is_multiple_of(SPINS) {
                thread::yield_now();
            } else {
                hint::spin_loop();
            }
        }
        // Every thread has left the closure: the next dispatch may start, and
        // the lock is released before a panic is re-raised (not poisoned).
        drop(one_at_a_time);
        if let Err(payload) = outcome {
            resume_unwind(payload);
        }
        if inner.panicked.load(Ordering::Relaxed) {
            panic!("a thread of the forward pass panicked");
        }
    }
}

/// A pool thread: waits for each dispatch, runs it, counts itself finished.
fn serve(inner: &Inner, index: usize) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0usize;
        loop {
            if inner.shutdown.load(Ordering::Acquire) {
                return;
            }
            if inner.generation.load(Ordering::Acquire) != seen {
                break;
            }
            spins += 1;
            if spins < SPINS {
                hint::spin_loop();
                continue;
            }
            // The dispatcher moves `generation` before it takes this lock to
            // notify, so a thread that saw no move under the lock is woken.
            let mut guard = inner.sleep.lock().unwrap_or_else(|e| e.into_inner());
            while inner.generation.load(Ordering::Acquire) == seen && !inner.shutdown.load(Ordering::Acquire) {
                guard = inner.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
        }
        seen = inner.generation.load(Ordering::Acquire);
        // SAFETY: see `unsafe impl Sync for Inner`: the job was stored before the
        // generation moved, and stays alive until this thread counts itself finished.
        let job = inner.job.with(|cell| unsafe { (*cell).map(|job| &*job) });
        if let Some(job) = job {
            let worker = Worker { index, count: inner.threads, inner };
            if catch_unwind(AssertUnwindSafe(|| job(&worker))).is_err() {
                inner.panicked.store(true, Ordering::Relaxed);
            }
        }
        inner.finished.fetch_add(1, Ordering::Release);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, Ordering::Release);
        {
            let _guard = self.inner.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.inner.wake.notify_all();
        }
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

/// A buffer the threads of one dispatch write in disjoint parts.
///
/// Through a shared reference (what a dispatch's threads hold) every access
/// is `unsafe` ([`Shared::get`], [`Shared::get_mut`]): the callers promise that
/// no element is written while another thread reads or writes it. The safe
/// accessors take `&mut self`, which no dispatch can hold, so they never race
/// with a thread's writes.
pub struct Shared<T> {
    ptr: *mut T,
    len: usize,
    owner: Vec<T>,
}

// SAFETY: threads holding `&Shared<T>` reach elements only through the unsafe
// methods, whose callers rule out a write racing any other access; elements
// are handed across threads as `&T` and `&mut T`, hence `Send + Sync`.
unsafe impl<T: Send + Sync> Sync for Shared<T> {}
// SAFETY: it owns its `Vec<T>`; the raw pointer points into it.
unsafe impl<T: Send> Send for Shared<T> {}

impl<T: Copy + Default> Shared<T> {
    pub fn new() -> Self {
        let mut owner = Vec::new();
        Self { ptr: owner.as_mut_ptr(), len: 0, owner }
    }

    /// Takes `owner` over as the buffer, all of it.
    pub fn from_vec(mut owner: Vec<T>) -> Self {
        Self { ptr: owner.as_mut_ptr(), len: owner.len(), owner }
    }

    /// Makes room for `len` elements (contents unspecified); allocates only to grow.
    pub fn resize(&mut self, len: usize) {
        if self.owner.len() < len {
            self.owner.resize(len, T::default());
        }
        self.ptr = self.owner.as_mut_ptr();
        self.len = len;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// # Safety
    /// No thread writes any of `range` while the returned slice lives.
    pub unsafe fn get(&self, range: Range<usize>) -> &[T] {
        assert!(range.start <= range.end && range.end <= self.len, "{range:?} outside {}", self.len);
        // SAFETY: in bounds (checked); the caller rules out concurrent writes.
        unsafe { std::slice::from_raw_parts(self.ptr.add(range.start), range.len()) }
    }

    /// # Safety
    /// No other thread reads or writes any of `range` while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get_mut(&self, range: Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.len, "{range:?} outside {}", self.len);
        // SAFETY: in bounds (checked); the caller rules out any other access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }

    /// The whole buffer, outside a dispatch (`&mut`: no thread holds it).
    pub fn as_slice(&mut self) -> &[T] {
        &self.owner[..self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.owner[..self.len]
    }
}

impl<T: Copy + Default> Default for Shared<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn shares_cover_everything_once_on_aligned_boundaries() {
        for (n, align, count) in [(576, 4, 2), (10, 4, 3), (3, 8, 4), (1536, 16, 5), (0, 4, 2)] {
            let pieces: Vec<_> = (0..count).map(|i| share(n, align, i, count)).collect();
            assert_eq!(pieces.first().map(|r| r.start), Some(0));
            assert_eq!(pieces.last().map(|r| r.end), Some(n));
            for pair in pieces.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
                assert!(pair[0].end == n || pair[0].end % align == 0);
            }
        }
    }

    #[test]
    fn every_thread_runs_every_phase_in_order() {
        let pool = Pool::new(3).expect("pool");
        let mut buf = Shared::<usize>::new();
        buf.resize(3 * 50);
        for round in 0..200 {
            pool.run(&|w| {
                for phase in 0..50 {
                    // SAFETY: each thread writes its own element of the phase.
                    unsafe { buf.get_mut(phase * 3 + w.index..phase * 3 + w.index + 1)[0] = round + phase };
                    w.barrier();
                    if phase > 0 {
                        // SAFETY: the previous phase's writes finished at the barrier.
                        let prev = unsafe { buf.get((phase - 1) * 3..phase * 3) };
                        assert!(prev.iter().all(|v| *v == round + phase - 1));
                    }
                }
            });
        }
        assert!(buf.as_slice().iter().enumerate().all(|(i, v)| *v == 199 + i / 3));
    }

    #[test]
    fn a_panic_on_any_thread_reaches_the_caller_and_the_pool_stays_usable() {
        let pool = Pool::new(2).expect("pool");
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|w| {
                if w.index == 1 {
                    panic!("boom");
                }
                w.barrier();
            })
        }));
        assert!(outcome.is_err());
        let count = AtomicUsize::new(0);
        pool.run(&|w| {
            w.barrier();
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use std::panic::{catch_unwind, AssertUnwindSafe};

    use loom::cell::UnsafeCell;

    use super::*;

    /// One slot per thread, every access visible to loom.
    struct Slots([UnsafeCell<usize>; 2]);
    // SAFETY: the tests write a slot only from its own thread, and read another
    // thread's slot only after a barrier or the end of the dispatch; loom fails
    // the test if that order does not make the accesses happen-before each other.
    unsafe impl Sync for Slots {}

    impl Slots {
        fn new() -> Self {
            Self([UnsafeCell::new(0), UnsafeCell::new(0)])
        }

        /// Thread `index`'s slot (a method, so closures capture `Slots`, not its cells).
        fn of(&self, index: usize) -> &UnsafeCell<usize> {
            &self.0[index]
        }
    }

    fn model(test: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(test);
    }

    #[test]
    fn each_dispatch_hands_the_job_over_and_its_barrier_orders_the_phases() {
        model(|| {
            let pool = Pool::new(2).expect("pool");
            let slots = Slots::new();
            for round in 1..=2 {
                pool.run(&|w| {
                    // SAFETY: each thread writes its own slot.
                    slots.of(w.index).with_mut(|slot| unsafe { *slot = round * 10 + w.index });
                    w.barrier();
                    // SAFETY: the other thread wrote its slot before the barrier.
                    let other = slots.of(1 - w.index).with(|slot| unsafe { *slot });
                    assert_eq!(other, round * 10 + 1 - w.index);
                });
            }
            for (index, slot) in slots.0.iter().enumerate() {
                // SAFETY: `run` returned: every thread has finished its writes.
                assert_eq!(slot.with(|slot| unsafe { *slot }), 20 + index);
            }
        });
    }

    #[test]
    fn a_pool_drops_cleanly_whether_its_threads_spin_or_sleep() {
        model(|| {
            let pool = Pool::new(3).expect("pool");
            assert_eq!(pool.threads(), 3);
            drop(pool);
        });
    }

    #[test]
    fn a_panic_on_a_pool_thread_reaches_the_caller_waiting_at_a_barrier() {
        quiet_expected_panics();
        model(|| {
            let pool = Pool::new(2).expect("pool");
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                pool.run(&|w| {
                    if w.index == 1 {
                        panic!("{EXPECTED}");
                    }
                    w.barrier();
                })
            }));
            assert!(outcome.is_err());
            let slots = Slots::new();
            pool.run(&|w| {
                // SAFETY: each thread writes its own slot.
                slots.of(w.index).with_mut(|slot| unsafe { *slot = 1 });
                w.barrier();
            });
            // SAFETY: `run` returned: every thread has finished its writes.
            assert!(slots.0.iter().all(|slot| slot.with(|slot| unsafe { *slot }) == 1));
        });
    }

    const EXPECTED: &str = "expected panic of a pool thread";

    /// The panic test panics once per interleaving: only other panics (loom's
    /// reports among them) are printed.
    fn quiet_expected_panics() {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info.payload().downcast_ref::<String>().map(String::as_str);
            let message = message.or_else(|| info.payload().downcast_ref::<&str>().copied());
            let expected = [EXPECTED, "another thread of the forward pass panicked"];
            if !message.is_some_and(|m| expected.contains(&m)) {
                report(info);
            }
        }));
    }
}
