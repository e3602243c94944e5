//! Build losses from MMDetection config dicts, given as JSON:
//! `{"type": "FocalLoss", "gamma": 1.5, "alpha": 0.5}`.
//!
//! The registry maps each `type` to a builder. The built-in losses are registered from the
//! start; add your own with [`register`] or [`register_config`].
//!
//! ```
//! use tch_detloss::registry;
//! let loss = registry::build_str(r#"{"type": "FocalLoss", "gamma": 1.5, "alpha": 0.5, "loss_weight": 2.0}"#)?;
//! assert_eq!(loss.type_name(), "FocalLoss");
//! assert!(registry::build_str(r#"{"type": "FocalLoss", "gama": 1.5}"#).is_err()); // names the valid keys
//! # anyhow::Ok(())
//! ```

use std::collections::BTreeMap;
use std::sync::{LazyLock, RwLock};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Loss;

/// Turns a config dict (with its `type`) into a loss.
pub type Builder = Box<dyn Fn(&Value) -> Result<Box<dyn Loss>> + Send + Sync>;

static REGISTRY: LazyLock<RwLock<BTreeMap<String, Builder>>> = LazyLock::new(|| {
    let mut m: BTreeMap<String, Builder> = BTreeMap::new();
    crate::losses::register_builtins(&mut |name, builder| {
        m.insert(name.into(), builder);
    });
    RwLock::new(m)
});

/// Parses a config dict into a config struct: the `type` key is dropped, other unknown keys are
/// errors that list the valid ones (with `#[serde(deny_unknown_fields)]` on the struct), and
/// missing keys take the struct's defaults (with `#[serde(default)]`).
pub fn parse_config<T: DeserializeOwned>(config: &Value) -> Result<T> {
    let mut obj = config
        .as_object()
        .ok_or_else(|| anyhow!("a loss config must be a JSON object, got {config}"))?
        .clone();
    let ty = obj
        .remove("type")
        .and_then(|t| t.as_str().map(String::from))
        .unwrap_or_default();
    serde_json::from_value(Value::Object(obj)).with_context(|| format!("invalid {ty} config"))
}

pub(crate) fn config_builder<T, F>(check: F) -> Builder
where
    T: DeserializeOwned + Loss + 'static,
    F: Fn(T) -> Result<T> + Send + Sync + 'static,
{
    Box::new(move |cfg: &Value| Ok(Box::new(check(parse_config::<T>(cfg)?)?) as Box<dyn Loss>))
}

/// Registers a builder for a config `type`. Registering a type twice is an error.
pub fn register(type_name: &str, builder: Builder) -> Result<()> {
    let mut m = REGISTRY
        .write()
        .map_err(|_| anyhow!("the loss registry lock is poisoned"))?;
    if m.contains_key(type_name) {
        bail!("loss type {type_name:?} is already registered");
    }
    m.insert(type_name.to_string(), builder);
    Ok(())
}

/// Registers a loss whose config struct is `T` (Deserialize with MMDetection's keys).
///
/// ```
/// use tch_detloss::{registry, Loss, LossArgs, Target};
/// #[derive(Debug, Default, serde::Deserialize)]
/// #[serde(default, deny_unknown_fields)]
/// struct Scaled { loss_weight: f64 }
/// impl Loss for Scaled {
///     fn type_name(&self) -> &str { "Scaled" }
///     fn forward(&self, pred: &tch::Tensor, _: Target<'_>, _: &LossArgs<'_>) -> anyhow::Result<tch::Tensor> {
///         Ok(pred.sum(None) * self.loss_weight)
///     }
///     fn forward_unfused(&self, pred: &tch::Tensor, t: Target<'_>, a: &LossArgs<'_>) -> anyhow::Result<tch::Tensor> {
///         self.forward(pred, t, a) // stock ops already
///     }
/// }
/// registry::register_config::<Scaled>("Scaled")?;
/// let l = registry::build_str(r#"{"type": "Scaled", "loss_weight": 2.0}"#)?;
/// # anyhow::Ok(())
/// ```
pub fn register_config<T: DeserializeOwned + Loss + 'static>(type_name: &str) -> Result<()> {
    register(type_name, config_builder(|l: T| Ok(l)))
}

/// Builds a loss from a config dict.
pub fn build(config: &Value) -> Result<Box<dyn Loss>> {
    let ty = config
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("a loss config needs a string \"type\", got {config}"))?;
    let m = REGISTRY
        .read()
        .map_err(|_| anyhow!("the loss registry lock is poisoned"))?;
    // MMDetection's KeyError text (DDQAuxLoss, which neither registers, meets it too), then
    // what is registered.
    let builder = m.get(ty).ok_or_else(|| {
        anyhow!(
            "{ty} is not in the mmdet::model registry. Please check whether the value of `{ty}` is correct or it was registered as expected. Registered: {}",
            m.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    builder(config)
}

/// Builds a loss from a config dict written as JSON text.
pub fn build_str(json: &str) -> Result<Box<dyn Loss>> {
    build(&serde_json::from_str(json).context("loss config is not valid JSON")?)
}

/// The registered config types, sorted.
pub fn registered_types() -> Vec<String> {
    REGISTRY
        .read()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}
