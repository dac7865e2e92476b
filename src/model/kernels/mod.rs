//! Fused CPU kernels (f32) for the work that dominated the time of candle's own ops.
//!
//! Profiles of `disendiff bench` (BENCHMARKS.md) showed candle's softmax (16% of the UNet
//! forward, most of it scalar libm `expf`), its tiled convolution (49% of sampling, gathering
//! patches element by element), batched products of tiny matrices, and two thread pools (gemm's
//! rayon threads and candle's barrier pool) spinning against each other on two cores. Here:
//!
//! - `simd`: the shared pieces: an `exp` and an `erfc` that the compiler vectorises,
//!   row kernels compiled for AVX2+FMA and picked at run time, work split over candle's pool;
//! - `buffers`: the f32 data behind a tensor, and output buffers;
//! - `elementwise`: softmax(scale·x), SiLU and GEGLU in one pass, as `CustomOp1`s whose
//!   backward is the exact analytic gradient (they sit on the training path); group norm with
//!   its affine part and SiLU in one pass (outside the graph);
//! - `gradients`: those backward passes, each one pass over the input and the gradient;
//! - `layer_norm`: layer norm with its frozen affine part, forward and backward in one pass;
//! - `products`: matrix products as row blocks on candle's pool (linear, its backward), and
//!   what their outputs start from (bias, residual);
//! - `attention`: attention fused per query block without materialising the probabilities;
//!   `small_heads`: its blocks for head dims of at most 16, in vector registers (AVX-512);
//! - `conv`: convolution as im2col + one product per image;
//! - `switch`: `DISENDIFF_KERNELS=off` turns all of them off ([`enabled`]).
//!
//! The product and convolution kernels are for tensors outside the autograd graph;
//! `model::ops` decides where each applies and keeps candle's ops as the general path (the
//! path f16, bf16 and CUDA take, and CPU f32 with the switch off).
//! Every kernel is tested against candle's ops or a float64 reference.

pub use attention::{attention, AttentionApply, AttentionProbs, FusedAttention};
pub use conv::{conv2d, conv2d_vec};
pub use elementwise::{group_norm, Geglu, ScaledSoftmax, Silu};
pub use layer_norm::LayerNorm;
pub use products::{linear, linear_vec, matmul, Accumulator};
pub use switch::{enabled, setting, ENV};

mod attention;
mod buffers;
mod conv;
mod elementwise;
mod gradients;
mod layer_norm;
mod products;
mod simd;
mod small_heads;
mod switch;
