use batchnorm::batch_norm;

#[batch_norm(features = 1099511627776, axes = [0])]
pub struct OneExtent;

#[batch_norm(features = [2147483649], axes = [0, 2])]
pub struct JustOver;

#[batch_norm(features = [3, 4294967296, 5], axes = [0])]
pub struct ExtentInAList;

#[batch_norm(features = [65536, 65536], axes = [0])]
pub struct Product;

fn main() {}
