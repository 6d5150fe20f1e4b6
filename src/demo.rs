//! `stagesync demo`: the README's first command.

pub async fn command() -> anyhow::Result<()> {
    anyhow::bail!("demo is not implemented yet")
}
