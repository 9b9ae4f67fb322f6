//! `wattn bench`.

use crate::error::Result;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

pub fn run(_args: BenchArgs) -> Result<()> {
    Err(crate::error::Error::Option("wattn bench is not built yet".into()))
}
