//! Reading `config.json` values with `transformers`' defaults: a missing or `null` key takes
//! the default, a present key of the wrong type is an error naming the key. Every family's
//! config parser uses these so the messages read the same.

use anyhow::Result;
use serde_json::Value;

/// Reads an integer key, falling back to `default` when absent or null.
pub fn int(obj: &Value, key: &str, default: i64) -> Result<i64> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_i64()
            .ok_or_else(|| anyhow::anyhow!("`{key}` must be an integer, got {v}")),
    }
}

/// Reads a number key, falling back to `default` when absent or null.
pub fn float(obj: &Value, key: &str, default: f64) -> Result<f64> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .ok_or_else(|| anyhow::anyhow!("`{key}` must be a number, got {v}")),
    }
}

/// Reads a boolean key, falling back to `default` when absent or null.
pub fn boolean(obj: &Value, key: &str, default: bool) -> Result<bool> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| anyhow::anyhow!("`{key}` must be true or false, got {v}")),
    }
}

/// Reads a string key, falling back to `default` when absent or null.
pub fn string<'a>(obj: &'a Value, key: &str, default: &'a str) -> Result<&'a str> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("`{key}` must be a string, got {v}")),
    }
}
