//! The JSON Schema of the configuration file, generated from the raw structs, so that
//! editors (taplo, Even Better TOML) complete and check `stoa.toml`. The shipped copy is
//! `config/stoa.schema.json`; `stoa schema` prints the current one.

use serde_json::Value;

use super::raw::RawFile;

/// The schema as pretty-printed JSON, ending in a newline.
pub fn schema_json() -> String {
    let mut schema = schemars::schema_for!(RawFile).to_value();
    drop_null(&mut schema);
    // A schema is plain JSON values and always serializes.
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

/// TOML has no null: a key left out is simply absent. Removes the `null` alternative that
/// optional fields get (`"type": ["string", "null"]`, `"anyOf": [{...}, {"type": "null"}]`).
fn drop_null(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Array(types)) = map.get_mut("type") {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let only = types.remove(0);
                    map.insert("type".into(), only);
                }
            }
            if let Some(Value::Array(options)) = map.get_mut("anyOf") {
                options.retain(|o| o.get("type").is_none_or(|t| t != "null"));
                if let [only] = options.as_slice() {
                    let only = only.clone();
                    map.remove("anyOf");
                    if let Value::Object(inner) = only {
                        map.extend(inner);
                    }
                }
            }
            map.values_mut().for_each(drop_null);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_null),
        _ => {}
    }
}
