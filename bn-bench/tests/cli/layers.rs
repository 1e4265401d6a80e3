//! The layers under test: a `#[batch_norm]` layer for every standard shape (none for a custom
//! one), and it computes what the runtime-generic layer computes.

use bn_bench::bench::fill;
use bn_bench::case::Case;
use bn_bench::layers::{macro_layer, runtime_layer};

#[test]
fn every_standard_shape_has_a_macro_layer() {
    for case in Case::all_standard() {
        let layer = macro_layer(&case).unwrap_or_else(|| panic!("{}: no macro layer", case.name));
        let runtime = runtime_layer(&case).unwrap();
        assert_eq!(layer.features(), case.features().iter().product::<usize>(), "{}", case.name);
        assert_eq!((layer.rank(), runtime.rank()), (case.shape.len(), case.shape.len()), "{}", case.name);
    }
    assert!(macro_layer(&Case::new(vec![4, 8, 3, 3], vec![0, 2, 3])).is_none());
}

#[test]
fn macro_and_runtime_layers_agree_on_s6() {
    let case = Case::all_standard().pop().unwrap();
    assert_eq!(case.name, "S6");
    let (mut a, mut b) = (macro_layer(&case).unwrap(), runtime_layer(&case).unwrap());
    let x = fill(case.len(), 7, 3.0);
    let dy = fill(case.len(), 8, 0.0);
    let (mut ya, mut yb) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    a.forward_train(&x, &case.shape, &mut ya).unwrap();
    b.forward_train(&x, &case.shape, &mut yb).unwrap();
    assert_eq!(ya, yb);
    a.forward_eval(&x, &case.shape, &mut ya).unwrap();
    b.forward_eval(&x, &case.shape, &mut yb).unwrap();
    assert_eq!(ya, yb);
    a.backward(&x, &dy, &case.shape, &mut ya).unwrap();
    b.backward(&x, &dy, &case.shape, &mut yb).unwrap();
    assert_eq!(ya, yb);
    assert_eq!((a.gamma_grad(), a.beta_grad()), (b.gamma_grad(), b.beta_grad()));
}
