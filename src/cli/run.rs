//! `wattn run`.

use crate::error::Result;

#[derive(clap::Args, Debug)]
pub struct RunArgs {}

pub fn run(_args: RunArgs) -> Result<()> {
    Err(crate::error::Error::Option("wattn run is not built yet".into()))
}
