//! The extension on burn's `Autodiff` backend: each pass records one graph node whose backward
//! is the fused backward kernel of the inner backend (as burn's own `batch_norm_train` does with
//! its `BatchNormTrainOps` node).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::tensor::FloatTensor;
use burn::backend::AutodiffBackend;

/// The autodiff tensor of inner backend `B` (burn's `AdTensor<B, C>`, not exported by name).
type AdTensor<B, C> = FloatTensor<Autodiff<B, C>>;

use crate::backend::{BatchNormBackend, FusedGradients, FusedTrainOutput, RunningStats, Saved};

/// Registers each gradient for the parent that needs one.
macro_rules! register {
    ($B:ty, $grads:expr, $parents:expr, $values:expr) => {
        for (parent, value) in $parents.into_iter().zip($values) {
            if let Some(node) = parent {
                $grads.register::<$B>(node.id, value);
            }
        }
    };
}

/// The training forward's node: parents x, gamma, beta.
#[derive(Debug)]
struct TrainNode;

impl<B: BatchNormBackend> Backward<B, 3> for TrainNode {
    /// The input (checkpointed) and what the forward saved (statistics, gamma, beta).
    type State = (NodeId, Saved);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, saved) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        let FusedGradients { x_grad, gamma_grad, beta_grad } =
            B::fused_batch_norm_train_backward(x, grad, saved);
        register!(B, grads, [node_x, node_gamma, node_beta], [x_grad, gamma_grad, beta_grad]);
    }
}

/// The inference forward's node: parents x, gamma, beta (the statistics are constants).
#[derive(Debug)]
struct EvalNode;

impl<B: BatchNormBackend> Backward<B, 3> for EvalNode {
    /// The input (checkpointed), gamma, beta, mean, variance, epsilon.
    type State = (
        NodeId,
        B::FloatTensorPrimitive,
        B::FloatTensorPrimitive,
        B::FloatTensorPrimitive,
        B::FloatTensorPrimitive,
        f64,
    );

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, gamma, beta, mean, variance, epsilon) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        let FusedGradients { x_grad, gamma_grad, beta_grad } =
            B::fused_batch_norm_eval_backward(x, gamma, beta, mean, variance, epsilon, grad);
        register!(B, grads, [node_x, node_gamma, node_beta], [x_grad, gamma_grad, beta_grad]);
    }
}

impl<B: BatchNormBackend, C: CheckpointStrategy> BatchNormBackend for Autodiff<B, C> {
    fn fused_batch_norm_train(
        x: AdTensor<B, C>,
        gamma: AdTensor<B, C>,
        beta: AdTensor<B, C>,
        epsilon: f64,
    ) -> FusedTrainOutput<Self> {
        match TrainNode.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let result = B::fused_batch_norm_train(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                );
                let output = prep.finish((x_state, result.saved.clone()), result.output);
                FusedTrainOutput {
                    output,
                    mean: Self::from_inner(result.mean),
                    variance: Self::from_inner(result.variance),
                    saved: result.saved,
                }
            }
            OpsKind::UnTracked(prep) => {
                let result = B::fused_batch_norm_train(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                );
                FusedTrainOutput {
                    output: prep.finish(result.output),
                    mean: Self::from_inner(result.mean),
                    variance: Self::from_inner(result.variance),
                    saved: result.saved,
                }
            }
        }
    }

    fn fused_batch_norm_train_backward(
        _x: AdTensor<B, C>,
        _output_grad: AdTensor<B, C>,
        _saved: Saved,
    ) -> FusedGradients<Self> {
        panic!("bn-burn batch norm: the backward pass is not differentiable (no second-order gradients)")
    }

    fn fused_batch_norm_eval(
        x: AdTensor<B, C>,
        gamma: AdTensor<B, C>,
        beta: AdTensor<B, C>,
        mean: AdTensor<B, C>,
        variance: AdTensor<B, C>,
        epsilon: f64,
    ) -> AdTensor<B, C> {
        let (mean, variance) = (mean.into_primitive(), variance.into_primitive());
        match EvalNode.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let (gamma, beta) = (gamma.into_primitive(), beta.into_primitive());
                let output = B::fused_batch_norm_eval(
                    x.into_primitive(),
                    gamma.clone(),
                    beta.clone(),
                    mean.clone(),
                    variance.clone(),
                    epsilon,
                );
                prep.finish((x_state, gamma, beta, mean, variance, epsilon), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_batch_norm_eval(
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
                mean,
                variance,
                epsilon,
            )),
        }
    }

    fn fused_batch_norm_eval_backward(
        _x: AdTensor<B, C>,
        _gamma: AdTensor<B, C>,
        _beta: AdTensor<B, C>,
        _mean: AdTensor<B, C>,
        _variance: AdTensor<B, C>,
        _epsilon: f64,
        _output_grad: AdTensor<B, C>,
    ) -> FusedGradients<Self> {
        panic!("bn-burn batch norm: the backward pass is not differentiable (no second-order gradients)")
    }

    fn fused_running_stats(
        running_mean: AdTensor<B, C>,
        running_var: AdTensor<B, C>,
        batch_mean: AdTensor<B, C>,
        batch_var: AdTensor<B, C>,
        momentum: f64,
        variance_factor: f64,
    ) -> RunningStats<Self> {
        // Statistics carry no gradient: the inner operation on the values, untracked.
        let result = B::fused_running_stats(
            running_mean.into_primitive(),
            running_var.into_primitive(),
            batch_mean.into_primitive(),
            batch_var.into_primitive(),
            momentum,
            variance_factor,
        );
        RunningStats { mean: Self::from_inner(result.mean), variance: Self::from_inner(result.variance) }
    }
}
