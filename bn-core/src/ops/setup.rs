//! The stateless passes' handle ([`BatchNormOps`]: layout, configuration, backend) and the
//! statistics a training forward returns ([`BatchStats`]).

use core::fmt;
use core::marker::PhantomData;

use crate::kernels::Backend;
use crate::{BnError, Config, Element, Layout, Param};

/// The passes of batch normalization for one layout and configuration, without state.
///
/// Built from a [`Layout`] and a validated [`Config`] (its `eps`, `activation`, `center`,
/// `scale`, `running_var`, `track_running_stats` and momentum are honored as by the layer).
/// See the [module documentation](self) for an example.
pub struct BatchNormOps<E: Element = f32> {
    pub(crate) layout: Layout,
    pub(crate) config: Config,
    backend: Option<Backend>,
    element: PhantomData<fn() -> E>,
}

impl<E: Element> Clone for BatchNormOps<E> {
    fn clone(&self) -> Self {
        BatchNormOps {
            layout: self.layout.clone(),
            config: self.config,
            backend: self.backend,
            element: PhantomData,
        }
    }
}

impl<E: Element> fmt::Debug for BatchNormOps<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchNormOps")
            .field("dtype", &E::NAME)
            .field("layout", &self.layout)
            .field("config", &self.config)
            .field("backend", &self.backend)
            .finish()
    }
}

/// The statistics of one training forward, which its backward takes back: the batch mean,
/// the biased variance and `1 / sqrt(var + eps)` per feature, the shape and how the forward
/// computed its output.
#[derive(Clone, Debug)]
pub struct BatchStats {
    pub(crate) shape: Vec<usize>,
    pub(crate) count: f64,
    pub(crate) mean: Vec<f64>,
    pub(crate) var: Vec<f64>,
    pub(crate) inv_std: Vec<f64>,
    pub(crate) backend: Backend,
    pub(crate) reference_y: bool,
}

impl BatchStats {
    /// No statistics, no buffers (what a call leaves in a layer while it borrows them).
    pub(crate) const EMPTY: BatchStats = BatchStats {
        shape: Vec::new(),
        count: 0.0,
        mean: Vec::new(),
        var: Vec::new(),
        inv_std: Vec::new(),
        backend: Backend::Scalar,
        reference_y: true,
    };

    /// Statistics of `channels` features, all zero, of no forward yet (the buffers a training
    /// forward fills).
    pub(crate) fn zeroed(channels: usize) -> Result<Self, BnError> {
        let f = |what: &str| crate::alloc::try_filled_vec(0.0f64, channels, what);
        Ok(BatchStats {
            shape: Vec::new(),
            count: 0.0,
            mean: f("the batch statistics")?,
            var: f("the batch statistics")?,
            inv_std: f("the batch statistics")?,
            backend: Backend::Scalar,
            reference_y: true,
        })
    }

    /// The batch mean of each feature.
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }

    /// The biased batch variance of each feature (divided by [`count`](Self::count)).
    pub fn var(&self) -> &[f64] {
        &self.var
    }

    /// `1 / sqrt(var + eps)` of each feature, as the normalization used it.
    pub fn inv_std(&self) -> &[f64] {
        &self.inv_std
    }

    /// The number of values each feature's statistics were computed from.
    pub fn count(&self) -> f64 {
        self.count
    }

    /// The shape of the batch.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
}

impl<E: Element> BatchNormOps<E> {
    /// The passes for `layout` with `config`.
    ///
    /// # Errors
    ///
    /// [`BnError::InvalidConfig`] for an invalid configuration.
    pub fn new(layout: Layout, config: Config) -> Result<Self, BnError> {
        config.validate()?;
        Ok(BatchNormOps { layout, config, backend: None, element: PhantomData })
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The backend the kernels run: the one given to [`set_backend`](Self::set_backend), else
    /// the process-wide [`Backend::detect`].
    pub fn backend(&self) -> Backend {
        self.backend.unwrap_or_else(Backend::detect)
    }

    /// Runs the kernels on `backend` (`None`: the process-wide choice, which honors
    /// `BN_BACKEND`). A backend this machine lacks is an error and changes nothing.
    ///
    /// # Errors
    ///
    /// [`BnError::InvalidConfig`] naming the backends this machine has.
    pub fn set_backend(&mut self, backend: Option<Backend>) -> Result<(), BnError> {
        if let Some(b) = backend.filter(|b| !b.is_available()) {
            let available: Vec<&str> = Backend::available().iter().map(|b| b.name()).collect();
            return Err(BnError::InvalidConfig(format!(
                "backend {b} is not supported by this CPU (available: {})",
                available.join(", ")
            )));
        }
        self.backend = backend;
        Ok(())
    }

    /// Stores the sums of a backward pass as the parameter gradients (zeros for a parameter the
    /// configuration fixes).
    pub(crate) fn store_grads(
        &self,
        sum_dy: &[f64],
        sum_dy_xhat: &[f64],
        dgamma: &mut [E::Param],
        dbeta: &mut [E::Param],
    ) {
        let (scale, center) = (self.config.get_scale(), self.config.get_center());
        for c in 0..dgamma.len() {
            dgamma[c] = if scale { E::Param::from_f64(sum_dy_xhat[c]) } else { E::Param::ZERO };
            dbeta[c] = if center { E::Param::from_f64(sum_dy[c]) } else { E::Param::ZERO };
        }
    }
}
