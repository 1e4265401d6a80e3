//! The contract ([`Isa`], [`Kernel`]) and the scalar forms every instruction set matches.

use super::bits::{f32_to_half, half_to_f32};

/// A kernel body, generic over the instruction set. `run` must be `#[inline(always)]` (and so
/// must everything it calls) so that it is compiled inside the `#[target_feature]` wrapper of
/// [`Isa::vectorize`].
pub(crate) trait Kernel {
    /// What the kernel returns.
    type Output;
    /// The body.
    fn run<I: Isa>(self, isa: I) -> Self::Output;
}

/// A serial piece of a kernel (a closure, `#[inline(always)]`), run inside the instruction
/// set's `#[target_feature]` wrapper so that its loops are vectorized for it.
pub(crate) struct Serial<F>(pub F);

impl<R, F: FnOnce() -> R> Kernel for Serial<F> {
    type Output = R;
    #[inline(always)]
    fn run<I: Isa>(self, _isa: I) -> R {
        (self.0)()
    }
}

/// An instruction set: `f32` vectors of `LANES` lanes and the operations the kernels need.
///
/// Loads and stores take slices and check their bounds (`load` needs `LANES` values, `load_tail`
/// fewer); in the kernels' loops those checks are provable and compiled away.
pub(crate) trait Isa: Copy + Send + Sync + 'static {
    /// Lanes per vector.
    const LANES: usize;
    /// An `f32` vector.
    type V: Copy;

    /// Runs `kernel` compiled for this instruction set.
    fn vectorize<K: Kernel>(self, kernel: K) -> K::Output;

    /// All lanes `x`.
    fn splat(self, x: f32) -> Self::V;
    /// All lanes zero.
    #[inline(always)]
    fn zero(self) -> Self::V {
        self.splat(0.0)
    }
    /// `a + b`.
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a - b`.
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b`.
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`, fused where the instruction set has FMA.
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// ReLU, lane by lane: `0` where `v < 0`, else `v` (NaN and `-0.0` pass through, as
    /// [`relu`] and x86's `max(0, v)`).
    fn relu(self, v: Self::V) -> Self::V;
    /// `g` where `v > 0`, else `0`, lane by lane (NaN in `v` gives `0`): the ReLU's gradient mask.
    fn pass_positive(self, v: Self::V, g: Self::V) -> Self::V;

    /// The first `LANES` values of `s` (panics if `s` is shorter).
    fn load(self, s: &[f32]) -> Self::V;
    /// Stores `v` into the first `LANES` values of `s` (panics if `s` is shorter).
    fn store(self, s: &mut [f32], v: Self::V);
    /// The `s.len() < LANES` values of `s` in the low lanes, zeros above.
    fn load_tail(self, s: &[f32]) -> Self::V;
    /// Stores the low `s.len() < LANES` lanes of `v` into `s`.
    fn store_tail(self, s: &mut [f32], v: Self::V);
    /// `v` with the lanes from `n` up set to zero.
    fn zero_from(self, v: Self::V, n: usize) -> Self::V;
    /// The sum of the lanes, in `f32`, by halving: lane `i` plus lane `i + LANES / 2`, and so
    /// on down to one lane. The order is part of the contract: [`Isa::sums`] must match it.
    fn sum(self, v: Self::V) -> f32;
    /// `out[j] = self.sum(v[j])` for every `j < v.len() <= LANES`, bit for bit; instruction
    /// sets may compute them together (a transposing reduction).
    #[inline(always)]
    fn sums(self, v: &[Self::V], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(v) {
            *o = self.sum(x);
        }
    }
    /// Stores `v` into the first `LANES` values of `s` with a non-temporal (streaming) store
    /// where the instruction set has one; `s` must start on a `4 * LANES`-byte boundary (checked).
    /// Call [`Isa::fence`] before other threads read what was streamed.
    #[inline(always)]
    fn stream(self, s: &mut [f32], v: Self::V) {
        self.store(s, v)
    }
    /// Stores the low `s.len() < LANES` lanes of `v` into `s` with non-temporal stores where
    /// the instruction set has them (as [`Isa::store_tail`] elsewhere): the partial vectors at
    /// the ends of a streamed segment. A regular store there fetches the line that the
    /// streaming stores of its other values then have to evict (runs of 1000 values starting
    /// 16 bytes into a line: S5 inference 1.25x slower than with every store streamed).
    /// Call [`Isa::fence`] before other threads read what was streamed.
    #[inline(always)]
    fn stream_tail(self, s: &mut [f32], v: Self::V) {
        self.store_tail(s, v)
    }
    /// Orders streaming stores before later stores (`sfence`).
    #[inline(always)]
    fn fence(self) {}
    /// Hints that the cache line holding `p` will be read soon. `p` may point anywhere: a
    /// prefetch never faults and dereferences nothing.
    #[inline(always)]
    fn prefetch(self, p: *const f32) {
        prefetch(p)
    }

    /// The first `LANES` 16-bit values of `s` (`bf16` bits when `BF16`, else `f16` bits),
    /// widened to `f32` exactly (panics if `s` is shorter). By default lane by lane; instruction
    /// sets with conversion instructions widen in registers.
    #[inline(always)]
    fn load_half<const BF16: bool>(self, s: &[u16]) -> Self::V {
        let mut a = [0.0f32; MAX_LANES];
        for (d, &b) in a[..Self::LANES].iter_mut().zip(&s[..Self::LANES]) {
            *d = half_to_f32::<BF16>(b);
        }
        self.load(&a)
    }
    /// The `s.len() < LANES` 16-bit values of `s` widened into the low lanes, zeros above.
    #[inline(always)]
    fn load_half_tail<const BF16: bool>(self, s: &[u16]) -> Self::V {
        assert!(s.len() < Self::LANES);
        let mut a = [0.0f32; MAX_LANES];
        for (d, &b) in a.iter_mut().zip(s) {
            *d = half_to_f32::<BF16>(b);
        }
        self.load(&a)
    }
    /// Stores `v` rounded to nearest even into the first `LANES` 16-bit values of `s` (panics if
    /// `s` is shorter): the bits of [`half::bf16::from_f32`] / [`half::f16::from_f32`] (a NaN
    /// stays a NaN).
    #[inline(always)]
    fn store_half<const BF16: bool>(self, s: &mut [u16], v: Self::V) {
        let mut a = [0.0f32; MAX_LANES];
        self.store(&mut a, v);
        for (d, &x) in s[..Self::LANES].iter_mut().zip(&a) {
            *d = f32_to_half::<BF16>(x);
        }
    }
    /// Stores the low `s.len() < LANES` lanes of `v`, rounded as [`Isa::store_half`].
    #[inline(always)]
    fn store_half_tail<const BF16: bool>(self, s: &mut [u16], v: Self::V) {
        assert!(s.len() < Self::LANES);
        let mut a = [0.0f32; MAX_LANES];
        self.store(&mut a, v);
        for (d, &x) in s.iter_mut().zip(&a) {
            *d = f32_to_half::<BF16>(x);
        }
    }
    /// `2 * LANES` values of `s` as two vectors in the order of [`Isa::load_half2`]: per-column
    /// parameters that go with values loaded in pairs.
    #[inline(always)]
    fn load_pair_order<const BF16: bool>(self, s: &[f32]) -> (Self::V, Self::V) {
        (self.load(s), self.load(&s[Self::LANES..]))
    }
    /// `2 * LANES` 16-bit values of `s` widened into two vectors, in an order of the
    /// instruction set's choosing (by default the first `LANES` values, then the next): for
    /// elementwise work and sums, where the order of the values does not matter.
    /// [`Isa::store_half2`] stores in the same order.
    #[inline(always)]
    fn load_half2<const BF16: bool>(self, s: &[u16]) -> (Self::V, Self::V) {
        (self.load_half::<BF16>(s), self.load_half::<BF16>(&s[Self::LANES..]))
    }
    /// Stores two vectors into `2 * LANES` 16-bit values of `s` as [`Isa::store_half`] does, in
    /// the order of [`Isa::load_half2`].
    #[inline(always)]
    fn store_half2<const BF16: bool>(self, s: &mut [u16], a: Self::V, b: Self::V) {
        self.store_half::<BF16>(s, a);
        self.store_half::<BF16>(&mut s[Self::LANES..], b);
    }
    /// [`Isa::store_half2`] with a non-temporal store where the instruction set has one (the
    /// same bits); `s` must start on a `4 * LANES`-byte boundary (checked there). Call
    /// [`Isa::fence`] before other threads read what was streamed.
    #[inline(always)]
    fn stream_half2<const BF16: bool>(self, s: &mut [u16], a: Self::V, b: Self::V) {
        self.store_half2::<BF16>(s, a, b)
    }
    /// The low `s.len() <= LANES` lanes of `v` rounded as [`Isa::store_half`], written with
    /// non-temporal stores where the instruction set has them (on x86 a value alone at an odd
    /// 2-byte position is stored the regular way: there is no 2-byte streaming store): the
    /// partial vectors at the ends of a streamed run. Call [`Isa::fence`] before other threads
    /// read what was streamed.
    #[inline(always)]
    fn stream_half_part<const BF16: bool>(self, s: &mut [u16], v: Self::V) {
        if s.len() == Self::LANES {
            self.store_half::<BF16>(s, v)
        } else {
            self.store_half_tail::<BF16>(s, v)
        }
    }
}

/// The most lanes of any instruction set (the stack arrays of the default 16-bit loads).
const MAX_LANES: usize = 16;

/// The scalar ReLU every instruction set matches bit for bit: `0` where `v < 0`, else `v`.
#[inline(always)]
pub(crate) fn relu(v: f32) -> f32 {
    if v < 0.0 {
        0.0
    } else {
        v
    }
}

/// The scalar [`Isa::pass_positive`]: `g` where `v > 0`, else `0`.
#[inline(always)]
pub(crate) fn pass_positive(v: f32, g: f32) -> f32 {
    if v > 0.0 {
        g
    } else {
        0.0
    }
}

/// A software prefetch into all cache levels (`prefetcht0` on x86-64; nothing elsewhere).
#[inline(always)]
pub(crate) fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86-64; a prefetch reads no memory and cannot fault, whatever `p`.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
