//! bn-candle against candle-nn's own `BatchNorm`: the same variables, the same inputs, the same
//! outputs, running statistics and gradients within floating-point tolerance.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::{BatchNormConfig, ModuleT, Optimizer, VarBuilder, VarMap};

const CPU: Device = Device::Cpu;

/// The largest absolute difference, relative to the largest magnitude of `expected` (at least 1).
fn rel_diff(got: &Tensor, expected: &Tensor) -> f64 {
    let got = got.to_dtype(DType::F64).unwrap();
    let expected = expected.to_dtype(DType::F64).unwrap();
    assert_eq!(got.dims(), expected.dims());
    let diff = (&got - &expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let scale = expected.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1.0);
    diff / scale
}

#[track_caller]
fn assert_close(got: &Tensor, expected: &Tensor, tol: f64, what: &str) {
    let d = rel_diff(got, expected);
    assert!(d <= tol, "{what}: relative difference {d:e} > {tol:e}");
}

/// Both modules, each over its own `VarMap` with the same random weight and bias.
struct Pair {
    ours: bn_candle::BatchNorm,
    theirs: candle_nn::BatchNorm,
}

fn pair(features: usize, config: BatchNormConfig, dtype: DType) -> Pair {
    let (map_ours, map_theirs) = (VarMap::new(), VarMap::new());
    let ours =
        bn_candle::batch_norm(features, config, VarBuilder::from_varmap(&map_ours, dtype, &CPU)).unwrap();
    let theirs =
        candle_nn::batch_norm(features, config, VarBuilder::from_varmap(&map_theirs, dtype, &CPU)).unwrap();
    if config.affine {
        let weight = Tensor::randn(1.0, 0.5, features, &CPU).unwrap().to_dtype(dtype).unwrap();
        let bias = Tensor::randn(0.0, 0.5, features, &CPU).unwrap().to_dtype(dtype).unwrap();
        for map in [map_ours, map_theirs] {
            let mut map = map;
            map.set_one("weight", &weight).unwrap();
            map.set_one("bias", &bias).unwrap();
        }
    }
    Pair { ours, theirs }
}

fn randn(shape: &[usize], mean: f64, std: f64) -> Tensor {
    Tensor::randn(mean as f32, std as f32, shape, &CPU).unwrap()
}

const SHAPES: &[&[usize]] =
    &[&[8, 3, 5, 5], &[16, 7], &[4, 6, 9], &[2, 5, 3, 2, 3], &[3, 2, 1, 1], &[1, 4, 3, 3], &[2, 33, 17, 1]];

/// Runs a few training steps on both and compares outputs and running statistics, then eval.
fn check_train_eval(config: BatchNormConfig, dtype: DType, tol: f64) {
    for shape in SHAPES {
        let p = pair(shape[1], config, dtype);
        for step in 0..3 {
            let x = randn(shape, 0.5 * step as f64, 1.0 + step as f64);
            let y_ours = p.ours.forward_t(&x.to_dtype(dtype).unwrap(), true).unwrap();
            let y_theirs = p.theirs.forward_t(&x.to_dtype(dtype).unwrap(), true).unwrap();
            assert_eq!(y_ours.dtype(), dtype);
            assert_close(&y_ours, &y_theirs, tol, &format!("train y {shape:?} step {step} {config:?}"));
            assert_close(p.ours.running_mean(), p.theirs.running_mean(), tol, "running_mean");
            assert_close(p.ours.running_var(), p.theirs.running_var(), tol, "running_var");
        }
        let x = randn(shape, 1.0, 2.0).to_dtype(dtype).unwrap();
        let y_ours = p.ours.forward_t(&x, false).unwrap();
        let y_theirs = p.theirs.forward_t(&x, false).unwrap();
        assert_close(&y_ours, &y_theirs, tol, &format!("eval y {shape:?} {config:?}"));
    }
}

fn configs() -> Vec<BatchNormConfig> {
    let base = BatchNormConfig::default();
    vec![
        base,
        BatchNormConfig { affine: false, ..base },
        BatchNormConfig { remove_mean: false, ..base },
        BatchNormConfig { remove_mean: false, affine: false, ..base },
        BatchNormConfig { momentum: 0.0, ..base },
        BatchNormConfig { momentum: 1.0, ..base },
        BatchNormConfig { momentum: 0.25, eps: 1e-3, ..base },
        BatchNormConfig::from(0.1),
    ]
}

#[test]
fn train_and_eval_match_candle_nn_for_every_config_f32() {
    for config in configs() {
        check_train_eval(config, DType::F32, 1e-5);
    }
}

#[test]
fn train_and_eval_match_candle_nn_f64() {
    for config in configs() {
        check_train_eval(config, DType::F64, 1e-12);
    }
}

/// The loss `sum(y * r)` and the gradients of x, weight and bias, for one module.
fn grads_of(
    module: &dyn ModuleT,
    weight_and_bias: Option<(&Tensor, &Tensor)>,
    x: &Tensor,
    r: &Tensor,
    train: bool,
) -> Vec<Tensor> {
    let x = Var::from_tensor(x).unwrap();
    let y = module.forward_t(x.as_tensor(), train).unwrap();
    let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![y, grads.get(x.as_tensor()).unwrap().clone()];
    if let Some((weight, bias)) = weight_and_bias {
        out.push(grads.get(weight).unwrap().clone());
        out.push(grads.get(bias).unwrap().clone());
    }
    out
}

fn check_grads(config: BatchNormConfig, dtype: DType, train: bool, tol: f64) {
    for shape in SHAPES {
        if train && shape.iter().product::<usize>() / shape[1] < 2 {
            continue;
        }
        let p = pair(shape[1], config, dtype);
        // Move the running statistics away from (0, 1) so that eval is not the identity.
        for _ in 0..2 {
            p.ours.forward_t(&randn(shape, 2.0, 3.0).to_dtype(dtype).unwrap(), true).unwrap();
            p.theirs.forward_t(&randn(shape, 2.0, 3.0).to_dtype(dtype).unwrap(), true).unwrap();
        }
        Var::from_tensor(p.ours.running_mean()).unwrap().set(p.theirs.running_mean()).unwrap();
        Var::from_tensor(p.ours.running_var()).unwrap().set(p.theirs.running_var()).unwrap();
        let x = randn(shape, 1.0, 2.0).to_dtype(dtype).unwrap();
        let r = randn(shape, 0.0, 1.0).to_dtype(dtype).unwrap();
        let ours = grads_of(&p.ours, p.ours.weight_and_bias(), &x, &r, train);
        let theirs = grads_of(&p.theirs, p.theirs.weight_and_bias(), &x, &r, train);
        for (what, (a, b)) in ["y", "dx", "dweight", "dbias"].iter().zip(ours.iter().zip(&theirs)) {
            assert_close(a, b, tol, &format!("{what} {shape:?} train={train} {config:?}"));
        }
    }
}

#[test]
fn gradients_match_candle_nn_train_and_eval() {
    for config in configs() {
        for train in [true, false] {
            check_grads(config, DType::F32, train, 1e-4);
            check_grads(config, DType::F64, train, 1e-10);
        }
    }
}

#[test]
fn two_applications_in_one_graph_have_their_own_statistics() {
    let p = pair(4, BatchNormConfig::default(), DType::F32);
    let shape = [6, 4, 3, 3];
    let (x1, x2) = (randn(&shape, 0.0, 1.0), randn(&shape, 3.0, 5.0));
    let (r1, r2) = (randn(&shape, 0.0, 1.0), randn(&shape, 0.0, 1.0));
    let run = |m: &dyn ModuleT, (w, b): (&Tensor, &Tensor)| {
        let (v1, v2) = (Var::from_tensor(&x1).unwrap(), Var::from_tensor(&x2).unwrap());
        let y1 = m.forward_t(&v1, true).unwrap();
        let y2 = m.forward_t(&v2, true).unwrap();
        // The second application sees the first's output too.
        let y3 = m.forward_t(&(&y1 * 2.0).unwrap(), true).unwrap();
        let loss =
            ((&y1 * &r1).unwrap().sum_all().unwrap() + (&y2 * &r2).unwrap().sum_all().unwrap()).unwrap();
        let loss = (loss + y3.sqr().unwrap().mean_all().unwrap()).unwrap();
        let g = loss.backward().unwrap();
        [v1.as_tensor(), v2.as_tensor(), w, b].map(|t| g.get(t).unwrap().clone())
    };
    let ours = run(&p.ours, p.ours.weight_and_bias().unwrap());
    let theirs = run(&p.theirs, p.theirs.weight_and_bias().unwrap());
    for (what, (a, b)) in ["dx1", "dx2", "dweight", "dbias"].iter().zip(ours.iter().zip(&theirs)) {
        assert_close(a, b, 1e-4, what);
    }
}

#[test]
fn sixteen_bit_within_their_precision() {
    for dtype in [DType::BF16, DType::F16] {
        let tol = if dtype == DType::BF16 { 2e-2 } else { 3e-3 };
        for param_dtype in [dtype, DType::F32] {
            for shape in SHAPES {
                // candle-nn cannot train on 16-bit data: the reference is its f32 module on the
                // same (rounded) data.
                let p16 = pair(shape[1], BatchNormConfig::default(), param_dtype);
                let p32 = pair(shape[1], BatchNormConfig::default(), DType::F32);
                let (w, b) = p16.ours.weight_and_bias().unwrap();
                let (w32, b32) = p32.theirs.weight_and_bias().unwrap();
                Var::from_tensor(w32).unwrap().set(&w.to_dtype(DType::F32).unwrap()).unwrap();
                Var::from_tensor(b32).unwrap().set(&b.to_dtype(DType::F32).unwrap()).unwrap();
                for step in 0..2 {
                    let x = randn(shape, step as f64, 2.0).to_dtype(dtype).unwrap();
                    let y = p16.ours.forward_t(&x, true).unwrap();
                    assert_eq!(y.dtype(), dtype);
                    let y32 = p32.theirs.forward_t(&x.to_dtype(DType::F32).unwrap(), true).unwrap();
                    assert_close(&y, &y32, tol, &format!("{dtype:?}/{param_dtype:?} train {shape:?}"));
                    assert_close(p16.ours.running_mean(), p32.theirs.running_mean(), tol, "running_mean");
                    assert_close(p16.ours.running_var(), p32.theirs.running_var(), tol, "running_var");
                }
                let x = randn(shape, 1.0, 2.0).to_dtype(dtype).unwrap();
                let r = randn(shape, 0.0, 1.0).to_dtype(dtype).unwrap();
                for train in [true, false] {
                    let ours = grads_of(&p16.ours, p16.ours.weight_and_bias(), &x, &r, train);
                    let x32 = x.to_dtype(DType::F32).unwrap();
                    let r32 = r.to_dtype(DType::F32).unwrap();
                    let theirs = grads_of(&p32.theirs, p32.theirs.weight_and_bias(), &x32, &r32, train);
                    for (what, (a, b)) in ["y", "dx", "dweight", "dbias"].iter().zip(ours.iter().zip(&theirs))
                    {
                        // Gradients summed over many 16-bit values carry more rounding.
                        let tol =
                            if what.starts_with("dw") || what.starts_with("db") { 4.0 * tol } else { tol };
                        assert_close(
                            a,
                            b,
                            tol,
                            &format!("{dtype:?}/{param_dtype:?} {what} {shape:?} train={train}"),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn constructors_and_accessors_match_candle_nn() {
    let c = 5;
    let mean = randn(&[c], 0.0, 1.0);
    let var = randn(&[c], 0.0, 1.0).abs().unwrap();
    let (w, b) = (randn(&[c], 1.0, 0.3), randn(&[c], 0.0, 0.3));
    let x = randn(&[7, c, 4], 1.0, 2.0);
    let pairs = [
        (
            bn_candle::BatchNorm::new(c, mean.clone(), var.clone(), w.clone(), b.clone(), 1e-4).unwrap(),
            candle_nn::BatchNorm::new(c, mean.clone(), var.clone(), w.clone(), b.clone(), 1e-4).unwrap(),
        ),
        (
            bn_candle::BatchNorm::new_no_bias(c, mean.clone(), var.clone(), 1e-4).unwrap(),
            candle_nn::BatchNorm::new_no_bias(c, mean.clone(), var.clone(), 1e-4).unwrap(),
        ),
        (
            bn_candle::BatchNorm::new_with_momentum(
                c,
                mean.clone(),
                var.clone(),
                w.clone(),
                b.clone(),
                1e-4,
                0.3,
            )
            .unwrap(),
            candle_nn::BatchNorm::new_with_momentum(
                c,
                mean.clone(),
                var.clone(),
                w.clone(),
                b.clone(),
                1e-4,
                0.3,
            )
            .unwrap(),
        ),
        (
            bn_candle::BatchNorm::new_no_bias_with_momentum(c, mean.clone(), var.clone(), 1e-4, 0.7).unwrap(),
            candle_nn::BatchNorm::new_no_bias_with_momentum(c, mean.clone(), var.clone(), 1e-4, 0.7).unwrap(),
        ),
    ];
    for (ours, theirs) in pairs {
        assert_eq!(ours.eps(), theirs.eps());
        assert_eq!(ours.momentum(), theirs.momentum());
        assert_eq!(ours.weight_and_bias().is_some(), theirs.weight_and_bias().is_some());
        assert_close(
            &ours.forward_t(&x, false).unwrap(),
            &theirs.forward_t(&x, false).unwrap(),
            1e-5,
            "eval",
        );
        assert_close(&ours.forward_train(&x).unwrap(), &theirs.forward_train(&x).unwrap(), 1e-5, "train");
        assert_close(ours.running_mean(), theirs.running_mean(), 1e-5, "running_mean");
        assert_close(ours.running_var(), theirs.running_var(), 1e-5, "running_var");
    }
    // Invalid arguments are refused as candle-nn refuses them.
    assert!(bn_candle::BatchNorm::new(c + 1, mean.clone(), var.clone(), w.clone(), b.clone(), 1e-4).is_err());
    assert!(bn_candle::BatchNorm::new(c, mean.clone(), var.clone(), w.clone(), b.clone(), -1.0).is_err());
    assert!(bn_candle::BatchNorm::new_with_momentum(c, mean.clone(), var, w, b, 1e-4, 1.5).is_err());
}

#[test]
fn varmap_holds_the_updated_running_statistics() {
    let map = VarMap::new();
    let bn =
        bn_candle::batch_norm(3, 1e-5, VarBuilder::from_varmap(&map, DType::F32, &CPU).pp("bn")).unwrap();
    let x = randn(&[10, 3, 2], 4.0, 2.0);
    bn.forward_t(&x, true).unwrap();
    let data = map.data().lock().unwrap();
    let names: Vec<&str> = {
        let mut n: Vec<&str> = data.keys().map(String::as_str).collect();
        n.sort();
        n
    };
    assert_eq!(names, ["bn.bias", "bn.running_mean", "bn.running_var", "bn.weight"]);
    let saved = data["bn.running_mean"].as_tensor().to_vec1::<f32>().unwrap();
    let expected =
        (x.transpose(0, 1).unwrap().flatten_from(1).unwrap().mean(D::Minus1).unwrap() * 0.1).unwrap();
    assert_close(&Tensor::new(saved, &CPU).unwrap(), &expected, 1e-5, "saved running_mean");
}

#[test]
fn non_contiguous_input_is_normalized_as_its_values() {
    let p = pair(5, BatchNormConfig::default(), DType::F32);
    let x = randn(&[6, 4, 5], 1.0, 2.0).transpose(1, 2).unwrap(); // (6, 5, 4), strided
    assert!(!x.is_contiguous());
    let ours = grads_of(&p.ours, p.ours.weight_and_bias(), &x, &randn(&[6, 5, 4], 0.0, 1.0), true);
    let y_theirs = p.theirs.forward_t(&x, true).unwrap();
    assert_close(&ours[0], &y_theirs, 1e-5, "y");
    let y_eval = p.ours.forward_t(&x.narrow(0, 1, 3).unwrap(), false).unwrap();
    let y_eval_theirs = p.theirs.forward_t(&x.narrow(0, 1, 3).unwrap(), false).unwrap();
    assert_close(&y_eval, &y_eval_theirs, 1e-5, "eval y");
}

/// The running statistics and the variables of `bn`, as bits (NaN equal to itself).
fn state(bn: &bn_candle::BatchNorm) -> Vec<Vec<u32>> {
    let bits = |t: &Tensor| t.to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect();
    let mut out = vec![bits(bn.running_mean()), bits(bn.running_var())];
    if let Some((w, b)) = bn.weight_and_bias() {
        out.push(bits(w));
        out.push(bits(b));
    }
    out
}

#[track_caller]
fn assert_error_without_change(bn: &bn_candle::BatchNorm, x: &Tensor, train: bool, message: &str) {
    let before = state(bn);
    let err = bn.forward_t(x, train).unwrap_err().to_string();
    assert!(err.contains(message), "error {err:?} does not contain {message:?}");
    assert_eq!(state(bn), before, "state changed on error");
}

#[test]
fn errors_carry_our_messages_and_change_nothing() {
    let p = pair(3, BatchNormConfig::default(), DType::F32);
    p.ours.forward_t(&randn(&[4, 3, 2], 1.0, 1.0), true).unwrap();
    let bn = &p.ours;
    assert_error_without_change(bn, &randn(&[4, 5, 2], 0.0, 1.0), true, "feature");
    assert_error_without_change(bn, &randn(&[4, 5, 2], 0.0, 1.0), false, "feature");
    assert_error_without_change(bn, &randn(&[1, 3], 0.0, 1.0), true, "more than 1 value per channel");
    assert_error_without_change(bn, &randn(&[3], 0.0, 1.0), true, "at least two dimensions");
    let mut v = randn(&[4, 3, 2], 0.0, 1.0).flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[5] = f32::NAN;
    let nan = Tensor::from_vec(v, (4, 3, 2), &CPU).unwrap();
    assert_error_without_change(bn, &nan, true, "non-finite");
    let inf = (randn(&[4, 3, 2], 0.0, 1.0) * f64::from(f32::MAX)).unwrap().affine(1e10, 0.0).unwrap();
    assert_error_without_change(bn, &inf, true, "non-finite");
    assert_error_without_change(
        bn,
        &randn(&[4, 3, 2], 0.0, 1.0).to_dtype(DType::F64).unwrap(),
        true,
        "dtype",
    );
    assert_error_without_change(
        bn,
        &randn(&[4, 3, 2], 0.0, 1.0).to_dtype(DType::U8).unwrap(),
        true,
        "f32, f64",
    );

    // A non-finite weight or a negative running variance: candle-nn propagates NaN.
    let bad = pair(3, BatchNormConfig::default(), DType::F32);
    let x = randn(&[4, 3, 2], 0.0, 1.0);
    let (weight, _) = bad.ours.weight_and_bias().unwrap();
    Var::from_tensor(weight).unwrap().set(&Tensor::new(&[1f32, f32::NAN, 1.0], &CPU).unwrap()).unwrap();
    assert_error_without_change(&bad.ours, &x, true, "non-finite");
    assert_error_without_change(&bad.ours, &x, false, "non-finite");
    let negative = pair(3, BatchNormConfig::default(), DType::F32);
    Var::from_tensor(negative.ours.running_var())
        .unwrap()
        .set(&Tensor::new(&[1f32, -1.0, 1.0], &CPU).unwrap())
        .unwrap();
    assert_error_without_change(&negative.ours, &x, false, "negative variance");

    // eps = 0 on a constant channel: candle-nn divides by zero, we refuse.
    let zero_eps = pair(2, BatchNormConfig::from(0.0), DType::F32);
    let constant =
        Tensor::cat(&[randn(&[5, 1, 3], 0.0, 1.0), Tensor::ones((5, 1, 3), DType::F32, &CPU).unwrap()], 1)
            .unwrap();
    let theirs = zero_eps.theirs.forward_t(&constant, true).unwrap();
    assert!(theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().any(|v| v.is_nan()));
    assert_error_without_change(&zero_eps.ours, &constant, true, "eps = 0");
    // With a variance, eps = 0 gives candle-nn's result.
    let x = randn(&[5, 2, 3], 0.0, 1.0);
    assert_close(
        &zero_eps.ours.forward_t(&x, true).unwrap(),
        &zero_eps.theirs.forward_t(&x, true).unwrap(),
        1e-5,
        "eps 0",
    );
}

/// conv + batch norm + relu + linear, built with either batch norm.
struct Model {
    conv: candle_nn::Conv2d,
    bn: Box<dyn ModuleT>,
    linear: candle_nn::Linear,
}

impl Model {
    fn new(vb: VarBuilder, ours: bool) -> Result<Self> {
        let conv = candle_nn::conv2d(1, 8, 3, Default::default(), vb.pp("conv"))?;
        let bn: Box<dyn ModuleT> = if ours {
            Box::new(bn_candle::batch_norm(8, 1e-5, vb.pp("bn"))?)
        } else {
            Box::new(candle_nn::batch_norm(8, 1e-5, vb.pp("bn"))?)
        };
        let linear = candle_nn::linear(8 * 6 * 6, 4, vb.pp("linear"))?;
        Ok(Model { conv, bn, linear })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = x.apply(&self.conv)?;
        let x = self.bn.forward_t(&x, train)?.relu()?;
        x.flatten_from(1)?.apply(&self.linear)
    }
}

#[test]
fn a_small_model_trains_to_the_same_losses() {
    let (map_theirs, mut map_ours) = (VarMap::new(), VarMap::new());
    let theirs = Model::new(VarBuilder::from_varmap(&map_theirs, DType::F32, &CPU), false).unwrap();
    let ours = Model::new(VarBuilder::from_varmap(&map_ours, DType::F32, &CPU), true).unwrap();
    for (name, var) in map_theirs.data().lock().unwrap().iter() {
        map_ours.set_one(name, var.as_tensor()).unwrap();
    }
    let images = randn(&[32, 1, 8, 8], 0.0, 1.0);
    let labels = Tensor::from_vec((0..32u32).map(|i| i % 4).collect::<Vec<_>>(), 32, &CPU).unwrap();
    let mut losses = [Vec::new(), Vec::new()];
    for (i, (model, map)) in [(&theirs, &map_theirs), (&ours, &map_ours)].into_iter().enumerate() {
        let mut sgd = candle_nn::SGD::new(map.all_vars(), 0.05).unwrap();
        for step in 0..30 {
            let batch = images.narrow(0, (step % 4) * 8, 8).unwrap();
            let target = labels.narrow(0, (step % 4) * 8, 8).unwrap();
            let logits = model.forward_t(&batch, true).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &target).unwrap();
            sgd.backward_step(&loss).unwrap();
            losses[i].push(loss.to_scalar::<f32>().unwrap());
        }
        let eval = model.forward_t(&images, false).unwrap();
        let loss = candle_nn::loss::cross_entropy(&eval, &labels).unwrap();
        losses[i].push(loss.to_scalar::<f32>().unwrap());
    }
    assert!(losses[0][29] < losses[0][0], "the model does not learn: {:?}", losses[0]);
    for (step, (a, b)) in losses[0].iter().zip(&losses[1]).enumerate() {
        assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "step {step}: candle-nn {a}, ours {b}");
    }
}

#[test]
fn sixteen_bit_training_runs_where_candle_nn_fails() {
    for dtype in [DType::BF16, DType::F16] {
        for param_dtype in [dtype, DType::F32] {
            let p = pair(3, BatchNormConfig::default(), param_dtype);
            let x = randn(&[4, 3, 5], 0.0, 1.0).to_dtype(dtype).unwrap();
            assert!(
                p.theirs.forward_t(&x, true).is_err(),
                "candle-nn trains on {dtype:?} with {param_dtype:?}"
            );
            assert_eq!(p.ours.forward_t(&x, true).unwrap().dtype(), dtype);
            assert_eq!(p.ours.running_mean().dtype(), param_dtype);
        }
    }
}

#[test]
fn the_module_is_clone_debug_send_sync_and_clones_share_state() {
    fn assert_traits<T: Clone + std::fmt::Debug + Send + Sync>() {}
    assert_traits::<bn_candle::BatchNorm>();
    let p = pair(2, BatchNormConfig::default(), DType::F32);
    let clone = p.ours.clone();
    clone.forward_t(&randn(&[4, 2, 3], 5.0, 1.0), true).unwrap();
    assert_eq!(state(&clone), state(&p.ours));
    assert!(format!("{:?}", p.ours).contains("BatchNorm"));
}
