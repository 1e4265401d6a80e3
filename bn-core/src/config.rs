//! Options of a layer: presets and explicit overrides.

use crate::BnError;

/// How the running variance is updated from a training batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RunningVar {
    /// With the biased batch variance `sum((x - mean)^2) / n` (the NumPy class, Keras).
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
/// | preset | momentum (weight of the old value) | eps | running variance | matches |
/// |---|---|---|---|---|
/// | [`Preset::Numpy`] (default) | 0.9 | 1e-5 | biased | the NumPy `BatchNormalization` class this crate reproduces |
/// | [`Preset::Pytorch`] | 0.9 (torch's `momentum=0.1`) | 1e-5 | unbiased | `torch.nn.BatchNorm*d` |
/// | [`Preset::Keras`] | 0.99 | 1e-3 | biased | `keras.layers.BatchNormalization` |
///
/// `"seed"` and [`Preset::Seed`] are older names of [`Preset::Numpy`], still accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Preset {
    /// The NumPy `BatchNormalization` class this crate reproduces: momentum 0.9 as the weight of
    /// the old running value, eps 1e-5, biased running variance.
    #[default]
    Numpy,
    /// PyTorch's `BatchNorm*d`: momentum 0.9 (torch's 0.1), eps 1e-5, unbiased running variance.
    /// Give PyTorch's momentum with [`Config::torch_momentum`]; [`Config::momentum`] is refused
    /// with this preset, so that torch's `0.1` is never read as the weight of the old value.
    Pytorch,
    /// Keras's `BatchNormalization`: momentum 0.99, eps 1e-3, biased running variance.
    Keras,
}

#[allow(non_upper_case_globals)]
impl Preset {
    /// The older name of [`Preset::Numpy`].
    #[deprecated(note = "renamed `Preset::Numpy`")]
    pub const Seed: Preset = Preset::Numpy;

    /// The preset's name as written in the attribute (`"numpy"`, `"pytorch"`, `"keras"`).
    pub const fn name(self) -> &'static str {
        match self {
            Preset::Numpy => "numpy",
            Preset::Pytorch => "pytorch",
            Preset::Keras => "keras",
        }
    }

    /// Parses a preset name as written in the attribute (`"seed"` is an alias of `"numpy"`).
    ///
    /// ```
    /// use batchnorm::Preset;
    /// assert_eq!(Preset::from_name("numpy"), Some(Preset::Numpy));
    /// assert_eq!(Preset::from_name("seed"), Some(Preset::Numpy));
    /// assert_eq!(Preset::from_name("torch"), None);
    /// ```
    pub fn from_name(name: &str) -> Option<Preset> {
        match name {
            "numpy" | "seed" => Some(Preset::Numpy),
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
/// **Momentum convention**: `momentum` is the weight of the *old* running value (the NumPy
/// class's and Keras's convention): `running = momentum * running + (1 - momentum) * batch`.
/// PyTorch's momentum `p` is the weight of the *new* value; [`Config::torch_momentum`] converts
/// (`momentum = 1 - p`). Starting from [`Preset::Pytorch`], [`Config::momentum`] is refused
/// ([`Config::validate`] fails and no layer is built): code ported from PyTorch passes
/// `torch_momentum(0.1)`.
///
/// ```
/// use batchnorm::{Config, Preset, RunningVar};
///
/// const CFG: Config = Config::preset(Preset::Pytorch).eps(1e-3).torch_momentum(0.01);
/// assert_eq!(CFG.get_momentum(), 0.99);
/// assert_eq!(CFG.get_running_var(), RunningVar::Unbiased);
/// assert_eq!(Config::new().momentum(0.99).get_momentum(), 0.99);
/// // PyTorch's 0.1 given as `momentum` would be the weight of the old value: refused.
/// assert!(Config::preset(Preset::Pytorch).momentum(0.1).validate().is_err());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Config {
    eps: f64,
    momentum: f64,
    cumulative: bool,
    running_var: RunningVar,
    center: bool,
    scale: bool,
    track_running_stats: bool,
    activation: Activation,
    /// Built from [`Preset::Pytorch`] (not part of equality: it changes no value).
    pytorch: bool,
    /// [`Config::momentum`] was called on a PyTorch configuration (refused by `validate`).
    momentum_refused: bool,
}

/// Equal when every option is: the preset a configuration started from is not compared.
impl PartialEq for Config {
    fn eq(&self, other: &Config) -> bool {
        let Config {
            eps,
            momentum,
            cumulative,
            running_var,
            center,
            scale,
            track_running_stats,
            activation,
            pytorch: _,
            momentum_refused,
        } = *self;
        eps == other.eps
            && momentum == other.momentum
            && cumulative == other.cumulative
            && running_var == other.running_var
            && center == other.center
            && scale == other.scale
            && track_running_stats == other.track_running_stats
            && activation == other.activation
            && momentum_refused == other.momentum_refused
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::new()
    }
}

impl Config {
    /// The default configuration: the `numpy` preset.
    pub const fn new() -> Config {
        Config::preset(Preset::Numpy)
    }

    /// The configuration of a preset, with `center`, `scale` and `track_running_stats` on.
    pub const fn preset(preset: Preset) -> Config {
        let (momentum, eps, running_var) = match preset {
            Preset::Numpy => (0.9, 1e-5, RunningVar::Biased),
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
            pytorch: matches!(preset, Preset::Pytorch),
            momentum_refused: false,
        }
    }

    /// Sets the epsilon added to the variance (must be positive and finite).
    pub const fn eps(mut self, eps: f64) -> Config {
        self.eps = eps;
        self
    }

    /// Sets the momentum: the weight of the old running value, in `[0, 1)`.
    ///
    /// Refused on a configuration built from [`Preset::Pytorch`] ([`Config::validate`] fails):
    /// PyTorch's `momentum` is the weight of the new value, so its `0.1` goes to
    /// [`Config::torch_momentum`].
    pub const fn momentum(mut self, momentum: f64) -> Config {
        self.momentum = momentum;
        self.cumulative = false;
        self.momentum_refused |= self.pytorch;
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
    /// use batchnorm::Config;
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
    /// use batchnorm::{Activation, BatchNorm, Config};
    ///
    /// let mut bn = BatchNorm::with_config(1, [0], Config::new().activation(Activation::Relu))?;
    /// let mut y = [0.0f32; 4];
    /// bn.forward_train(&[1.0, 2.0, 3.0, 4.0], &[4, 1], &mut y)?;
    /// assert_eq!(&y[..2], &[0.0, 0.0]);
    /// assert!(y[2] > 0.0 && y[3] > y[2]);
    /// # Ok::<(), batchnorm::BnError>(())
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

    /// Checks the values: `eps` positive and finite, `momentum` in `[0, 1)`, and no
    /// [`Config::momentum`] on a [`Preset::Pytorch`] configuration.
    pub fn validate(&self) -> Result<(), BnError> {
        if self.momentum_refused {
            return Err(BnError::InvalidConfig(
                "momentum is refused with the pytorch preset: it is the weight of the old running \
                 value, while PyTorch's momentum is the weight of the new one; write \
                 torch_momentum(0.1) for PyTorch's momentum=0.1"
                    .to_string(),
            ));
        }
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
