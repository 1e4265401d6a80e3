//! Options of a layer: presets and explicit overrides.

use crate::BnError;

/// How the running variance is updated from a training batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RunningVar {
    /// With the biased batch variance `sum((x - mean)^2) / n` (the seed, Keras).
    #[default]
    Biased,
    /// With the unbiased batch variance `sum((x - mean)^2) / (n - 1)` (PyTorch).
    Unbiased,
}

/// The activation fused into a layer's forward passes (and differentiated by its backward).
///
/// With [`Activation::Relu`], `forward_train` and `forward_eval` write `relu(bn(x))` in the same
/// pass, and `backward` / `backward_eval` take the gradient of that output: they pass `dy`
/// where the forward's pre-activation was positive. The mask is not stored: it is recomputed
/// from `x` and the statistics of that forward, with the forward's own arithmetic, so it is
/// exactly `y > 0`. `relu(v)` is `0` for `v < 0` and `v` otherwise: NaN passes through, as
/// in PyTorch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Activation {
    /// No activation: the layer's output is the normalized value.
    #[default]
    Identity,
    /// `max(0, y)`, fused.
    Relu,
}

impl Activation {
    /// The name used by the attribute's `activation` key (`"none"`, `"relu"`).
    pub const fn name(self) -> &'static str {
        match self {
            Activation::Identity => "none",
            Activation::Relu => "relu",
        }
    }

    /// Parses a name as written in the attribute (`"none"`, `"identity"` or `"relu"`).
    pub fn from_name(name: &str) -> Option<Activation> {
        match name {
            "none" | "identity" => Some(Activation::Identity),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }
}

/// Named sets of defaults matching a reference implementation.
///
/// | preset | momentum | eps | running_var | matches |
/// |---|---|---|---|---|
/// | [`Preset::Seed`] (default) | 0.9 | 1e-5 | biased | the seed's NumPy class |
/// | [`Preset::Pytorch`] | 0.9 (torch 0.1) | 1e-5 | unbiased | `torch.nn.BatchNorm*d` |
/// | [`Preset::Keras`] | 0.99 | 1e-3 | biased | `keras.layers.BatchNormalization` |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Preset {
    /// The seed's NumPy design: momentum 0.9, eps 1e-5, biased running variance.
    #[default]
    Seed,
    /// PyTorch's `BatchNorm*d`: momentum 0.9 (torch's 0.1), eps 1e-5, unbiased running variance.
    Pytorch,
    /// Keras's `BatchNormalization`: momentum 0.99, eps 1e-3, biased running variance.
    Keras,
}

impl Preset {
    /// The preset's name as written in the attribute (`"seed"`, `"pytorch"`, `"keras"`).
    pub const fn name(self) -> &'static str {
        match self {
            Preset::Seed => "seed",
            Preset::Pytorch => "pytorch",
            Preset::Keras => "keras",
        }
    }

    /// Parses a preset name as written in the attribute.
    pub fn from_name(name: &str) -> Option<Preset> {
        match name {
            "seed" => Some(Preset::Seed),
            "pytorch" => Some(Preset::Pytorch),
            "keras" => Some(Preset::Keras),
            _ => None,
        }
    }
}

/// The options of a layer.
///
/// Start from a preset and override what differs; every setter is a `const fn`, so a
/// configuration can be a constant. Values are checked when a layer is built
/// ([`Config::validate`]).
///
/// **Momentum convention**: `momentum` is the weight of the *old* running value (the seed's and
/// Keras's convention): `running = momentum * running + (1 - momentum) * batch`. PyTorch's
/// momentum `p` is the weight of the *new* value; [`Config::torch_momentum`] converts
/// (`momentum = 1 - p`).
///
/// ```
/// use bn_core::{Config, Preset, RunningVar};
///
/// const CFG: Config = Config::preset(Preset::Pytorch).eps(1e-3);
/// assert_eq!(CFG.get_momentum(), 0.9);
/// assert_eq!(CFG.get_running_var(), RunningVar::Unbiased);
/// assert_eq!(Config::new().torch_momentum(0.01).get_momentum(), 0.99);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    eps: f64,
    momentum: f64,
    cumulative: bool,
    running_var: RunningVar,
    center: bool,
    scale: bool,
    track_running_stats: bool,
    activation: Activation,
}

impl Default for Config {
    fn default() -> Self {
        Config::new()
    }
}

impl Config {
    /// The default configuration: the `seed` preset.
    pub const fn new() -> Config {
        Config::preset(Preset::Seed)
    }

    /// The configuration of a preset, with `center`, `scale` and `track_running_stats` on.
    pub const fn preset(preset: Preset) -> Config {
        let (momentum, eps, running_var) = match preset {
            Preset::Seed => (0.9, 1e-5, RunningVar::Biased),
            Preset::Pytorch => (0.9, 1e-5, RunningVar::Unbiased),
            Preset::Keras => (0.99, 1e-3, RunningVar::Biased),
        };
        Config {
            eps,
            momentum,
            cumulative: false,
            running_var,
            center: true,
            scale: true,
            track_running_stats: true,
            activation: Activation::Identity,
        }
    }

    /// Sets the epsilon added to the variance (must be positive and finite).
    pub const fn eps(mut self, eps: f64) -> Config {
        self.eps = eps;
        self
    }

    /// Sets the momentum: the weight of the old running value, in `[0, 1)`.
    pub const fn momentum(mut self, momentum: f64) -> Config {
        self.momentum = momentum;
        self.cumulative = false;
        self
    }

    /// Sets the momentum from PyTorch's convention: `p` in `(0, 1]` is the weight of the new value,
    /// so this sets `momentum = 1 - p`.
    pub const fn torch_momentum(mut self, p: f64) -> Config {
        self.momentum = 1.0 - p;
        self.cumulative = false;
        self
    }

    /// Uses a cumulative moving average instead of an exponential one (PyTorch's
    /// `momentum=None`): after `k` training batches the running statistics are the plain average
    /// of the `k` batch statistics, i.e. batch `k` has weight `1/k`
    /// ([`BatchNorm::num_batches_tracked`](crate::BatchNorm::num_batches_tracked) counts them).
    ///
    /// ```
    /// use bn_core::Config;
    /// assert!(Config::new().cumulative_momentum().get_cumulative_momentum());
    /// assert!(!Config::new().cumulative_momentum().momentum(0.9).get_cumulative_momentum());
    /// ```
    pub const fn cumulative_momentum(mut self) -> Config {
        self.cumulative = true;
        self
    }

    /// Chooses the batch variance used to update the running variance.
    pub const fn running_var(mut self, running_var: RunningVar) -> Config {
        self.running_var = running_var;
        self
    }

    /// With `false`, beta is fixed at 0 and gets no gradient (Keras's `center`).
    pub const fn center(mut self, center: bool) -> Config {
        self.center = center;
        self
    }

    /// With `false`, gamma is fixed at 1 and gets no gradient (Keras's `scale`).
    pub const fn scale(mut self, scale: bool) -> Config {
        self.scale = scale;
        self
    }

    /// With `false`, both modes normalize with the batch statistics and the running buffers are
    /// never read or written (PyTorch's `track_running_stats`).
    pub const fn track_running_stats(mut self, track: bool) -> Config {
        self.track_running_stats = track;
        self
    }

    /// Fuses an activation into the forward passes (see [`Activation`]).
    ///
    /// ```
    /// use bn_core::{Activation, BatchNorm, Config};
    ///
    /// let mut bn = BatchNorm::with_config(1, [0], Config::new().activation(Activation::Relu))?;
    /// let mut y = [0.0f32; 4];
    /// bn.forward_train(&[1.0, 2.0, 3.0, 4.0], &[4, 1], &mut y)?;
    /// assert_eq!(&y[..2], &[0.0, 0.0]);
    /// assert!(y[2] > 0.0 && y[3] > y[2]);
    /// # Ok::<(), bn_core::BnError>(())
    /// ```
    pub const fn activation(mut self, activation: Activation) -> Config {
        self.activation = activation;
        self
    }

    /// The fused activation.
    pub const fn get_activation(&self) -> Activation {
        self.activation
    }

    /// The epsilon added to the variance.
    pub const fn get_eps(&self) -> f64 {
        self.eps
    }

    /// The momentum (weight of the old running value).
    pub const fn get_momentum(&self) -> f64 {
        self.momentum
    }

    /// Whether the running statistics are a cumulative moving average
    /// ([`Config::cumulative_momentum`]); [`Config::get_momentum`] is then unused.
    pub const fn get_cumulative_momentum(&self) -> bool {
        self.cumulative
    }

    /// Which batch variance updates the running variance.
    pub const fn get_running_var(&self) -> RunningVar {
        self.running_var
    }

    /// Whether beta is learned (`false`: fixed at 0).
    pub const fn get_center(&self) -> bool {
        self.center
    }

    /// Whether gamma is learned (`false`: fixed at 1).
    pub const fn get_scale(&self) -> bool {
        self.scale
    }

    /// Whether running statistics are kept and used by inference.
    pub const fn get_track_running_stats(&self) -> bool {
        self.track_running_stats
    }

    /// Checks the values: `eps` positive and finite, `momentum` in `[0, 1)`.
    pub fn validate(&self) -> Result<(), BnError> {
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(BnError::InvalidConfig(format!(
                "eps must be a positive finite number, got {}",
                self.eps
            )));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(BnError::InvalidConfig(format!(
                "momentum (weight of the old running value) must be in [0, 1), got {} \
                 (PyTorch's momentum p corresponds to 1 - p)",
                self.momentum
            )));
        }
        Ok(())
    }
}
