//! Each variant of `common::VARIANTS`, fused, against its unfused composition in float64 on the
//! CPU, in every dtype: one test per variant (`matrix::<variant>`), generated from the table.

use rstest::rstest;
use tch::{Device, Kind};

use crate::common::check_variant;

macro_rules! matrix {
    ($($name:ident)*) => {$(
        #[rstest]
        fn $name(#[values(Kind::Double, Kind::Float, Kind::Half, Kind::BFloat16)] kind: Kind) {
            check_variant(stringify!($name), kind, Device::Cpu);
        }
    )*};
}

for_each_variant!(matrix);
