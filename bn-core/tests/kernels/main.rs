//! bn-core's kernel tests, as one test crate with a module per subject, so that they compile and
//! link once: every backend against the scalar reference, the 16-bit layers, the fused ReLU's
//! kernels and the synchronized statistics' kernels. `kernel_alloc` stays a crate of its own:
//! its global allocator counts every allocation of the process.

mod common;

mod backends;
mod half_layers;
mod relu_kernels;
mod sync_kernels;
