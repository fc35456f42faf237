//! The config file of `drover serve` and `drover lab` (`--config FILE` or `DROVER_CONFIG`).
//!
//! A TOML file whose keys are the command's long options, with their values:
//!
//! ```toml
//! listen = "0.0.0.0:8443"
//! vro-listen = "0.0.0.0:9898"
//! em-listen = "0.0.0.0:9398"
//! em-http-listen = "0.0.0.0:9399"
//! em-external-url = "https://dr.example.com"
//! data-dir = "/var/lib/drover"
//! plain-http = false
//! ```
//!
//! What the command line says wins, then the environment (`DROVER_LISTEN`, ...), then the file,
//! then the built-in defaults: the file's values become the options' defaults, so clap applies the
//! order itself. A key that is not an option of the command is an error, not ignored: a misspelt
//! setting must not silently leave a listener on its default address.

use std::path::Path;

use anyhow::{Context, bail};
use clap::{ArgMatches, Command};

/// The settings of a config file, as (long option, value) pairs.
pub fn read(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the config file {}", path.display()))?;
    let table: toml::Table = text.parse().with_context(|| format!("{} is not valid TOML", path.display()))?;
    table
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Float(f) => f.to_string(),
                // A list (`datastore-root = ["/srv/a", "/srv/b"]`): the options that take several
                // values split them at commas.
                toml::Value::Array(items) => items
                    .iter()
                    .map(|v| match v {
                        toml::Value::String(s) if !s.contains(',') => Ok(s.clone()),
                        _ => bail!("{}: `{key}` must be a list of strings without commas", path.display()),
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?
                    .join(","),
                other => bail!(
                    "{}: `{key}` must be a string, a number or a boolean, not {}",
                    path.display(),
                    other.type_str()
                ),
            };
            Ok((key, value))
        })
        .collect()
}

/// `command`'s subcommand `sub` with `settings` as its options' defaults. Fails on a key that is
/// not one of its long options (or is `config` itself).
pub fn with_defaults(
    command: Command,
    sub: &str,
    settings: &[(String, String)],
    file: &Path,
) -> anyhow::Result<Command> {
    let Some(subcommand) = command.find_subcommand(sub) else { bail!("no subcommand {sub}") };
    let mut ids = Vec::new();
    for (key, value) in settings {
        let arg = subcommand.get_arguments().find(|a| a.get_long() == Some(key.as_str()) && key != "config");
        let Some(arg) = arg else {
            let known: Vec<&str> = subcommand
                .get_arguments()
                .filter_map(|a| a.get_long())
                .filter(|l| *l != "config" && *l != "help")
                .collect();
            bail!("{}: `{key}` is not a setting of `drover {sub}` (settings: {})", file.display(), known.join(", "));
        };
        ids.push((arg.get_id().to_string(), value.clone()));
    }
    Ok(command.mut_subcommand(sub, |mut sc| {
        for (id, value) in ids {
            sc = sc.mut_arg(id, |a| a.default_value(value));
        }
        sc
    }))
}

/// The config file named on the command line or in the environment, if any, for `sub`.
pub fn named(matches: &ArgMatches, sub: &str) -> Option<std::path::PathBuf> {
    matches.subcommand_matches(sub)?.get_one::<std::path::PathBuf>("config").cloned()
}
