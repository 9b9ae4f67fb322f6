//! `wattn info`.

use crate::error::Result;

#[derive(clap::Args, Debug)]
pub struct InfoArgs {}

pub fn run(_args: InfoArgs) -> Result<()> {
    Err(crate::error::Error::Option("wattn info is not built yet".into()))
}
