//! `wattn peak`.

use crate::error::Result;

#[derive(clap::Args, Debug)]
pub struct PeakArgs {}

pub fn run(_args: PeakArgs) -> Result<()> {
    Err(crate::error::Error::Option("wattn peak is not built yet".into()))
}
