//! Request bodies of the OpenAI API, parsed by hand from JSON so that every error names its field:
//! a missing or mistyped field, a value out of range, and any field sinew does not implement (tools,
//! response_format, …) are a 400 naming the field — never silently ignored. `null` counts as absent,
//! as OpenAI's clients send it.

use std::collections::HashSet;

use engine::{DecodeParams, Message, SamplingParams};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Most choices per request.
pub const MAX_N: usize = 16;
/// Most stop strings.
pub const MAX_STOP: usize = 4;

/// A body's fields, with the ones read so far.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    read: HashSet<&'static str>,
}

fn type_error(name: &str, want: &str, got: &Value) -> ApiError {
    let kind = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ApiError::bad(
        Some(name.to_string()),
        format!("'{name}' must be {want}, not {kind}"),
    )
}

impl<'a> Fields<'a> {
    fn new(body: &'a Value) -> Result<Self, ApiError> {
        let map = body
            .as_object()
            .ok_or_else(|| ApiError::bad(None, "the request body must be a JSON object"))?;
        Ok(Fields {
            map,
            read: HashSet::new(),
        })
    }

    fn get(&mut self, name: &'static str) -> Option<&'a Value> {
        self.read.insert(name);
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn f32(&mut self, name: &'static str, min: f32, max: f32) -> Result<Option<f32>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let x = v.as_f64().ok_or_else(|| type_error(name, "a number", v))? as f32;
        if !(min..=max).contains(&x) {
            return Err(ApiError::bad(
                Some(name.to_string()),
                format!("'{name}' must be between {min} and {max}, not {x}"),
            ));
        }
        Ok(Some(x))
    }

    fn int(&mut self, name: &'static str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let x = v
            .as_i64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                    .map(|f| f as i64)
            })
            .ok_or_else(|| type_error(name, "an integer", v))?;
        if !(min..=max).contains(&x) {
            return Err(ApiError::bad(
                Some(name.to_string()),
                format!("'{name}' must be between {min} and {max}, not {x}"),
            ));
        }
        Ok(Some(x))
    }

    fn bool(&mut self, name: &'static str) -> Result<Option<bool>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        v.as_bool()
            .map(Some)
            .ok_or_else(|| type_error(name, "a boolean", v))
    }

    fn string(&mut self, name: &'static str) -> Result<Option<&'a str>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        v.as_str()
            .map(Some)
            .ok_or_else(|| type_error(name, "a string", v))
    }

    fn stop(&mut self) -> Result<Vec<String>, ApiError> {
        let Some(v) = self.get("stop") else {
            return Ok(Vec::new());
        };
        let stops: Vec<String> = match v {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| type_error("stop", "a string or a list of strings", x))
                })
                .collect::<Result<_, _>>()?,
            other => return Err(type_error("stop", "a string or a list of strings", other)),
        };
        if stops.len() > MAX_STOP {
            return Err(ApiError::bad(
                Some("stop".into()),
                format!("at most {MAX_STOP} stop sequences, not {}", stops.len()),
            ));
        }
        if stops.iter().any(String::is_empty) {
            return Err(ApiError::bad(
                Some("stop".into()),
                "a stop sequence is empty",
            ));
        }
        Ok(stops)
    }

    /// Fails on any field not read (with a value): sinew does not implement it.
    fn finish(self, ignored: &[&str]) -> Result<(), ApiError> {
        let mut keys: Vec<&String> = self.map.keys().collect();
        keys.sort();
        for k in keys {
            if self.read.contains(k.as_str()) || ignored.contains(&k.as_str()) {
                continue;
            }
            let v = &self.map[k];
            let empty = v.is_null()
                || v.as_object().is_some_and(Map::is_empty)
                || v.as_array().is_some_and(Vec::is_empty);
            if !empty {
                return Err(ApiError::bad_code(
                    k,
                    format!("'{k}' is not supported by this server"),
                    "unsupported_parameter",
                ));
            }
        }
        Ok(())
    }
}

/// What chat and completion requests share.
#[derive(Clone, Debug)]
pub struct Common {
    /// The model asked for.
    pub model: String,
    /// Decoding parameters (max_tokens filled in by the route).
    pub params: DecodeParams,
    /// Choices per prompt.
    pub n: usize,
    /// Stream with server-sent events.
    pub stream: bool,
    /// A last chunk with usage (streaming).
    pub include_usage: bool,
}

fn common(f: &mut Fields<'_>, default_max: Option<usize>) -> Result<Common, ApiError> {
    let model = f
        .string("model")?
        .ok_or_else(|| ApiError::bad(Some("model".into()), "'model' is required"))?
        .to_string();
    let max = f.int("max_completion_tokens", 0, i64::from(u32::MAX))?;
    let max = match max {
        Some(m) => Some(m),
        None => f.int("max_tokens", 0, i64::from(u32::MAX))?,
    };
    let temperature = f.f32("temperature", 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = f.f32("top_p", 0.0, 1.0)?;
    if top_p == Some(0.0) {
        return Err(ApiError::bad(
            Some("top_p".into()),
            "'top_p' must be above 0",
        ));
    }
    let top_k = f.int("top_k", -1, i64::from(u32::MAX))?;
    let min_p = f.f32("min_p", 0.0, 1.0)?;
    let presence_penalty = f.f32("presence_penalty", -2.0, 2.0)?.unwrap_or(0.0);
    let frequency_penalty = f.f32("frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0);
    let repetition_penalty = f.f32("repetition_penalty", 0.01, 100.0)?.unwrap_or(1.0);
    let seed = f.int("seed", i64::MIN, i64::MAX)?;
    let n = f.int("n", 1, MAX_N as i64)?.unwrap_or(1) as usize;
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => {
            if !stream {
                return Err(ApiError::bad(
                    Some("stream_options".into()),
                    "'stream_options' is only allowed when 'stream' is true",
                ));
            }
            for k in o.keys() {
                if k != "include_usage" {
                    return Err(ApiError::bad_code(
                        "stream_options",
                        format!("'stream_options.{k}' is not supported by this server"),
                        "unsupported_parameter",
                    ));
                }
            }
            match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(type_error(
                        "stream_options.include_usage",
                        "a boolean",
                        other,
                    ));
                }
            }
        }
        Some(other) => return Err(type_error("stream_options", "an object", other)),
    };
    let stop = f.stop()?;
    // vLLM's extension: generate max_tokens whatever the end-of-sequence tokens say
    let ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);
    let seed = seed.map_or_else(random_seed, |s| s as u64);
    Ok(Common {
        model,
        params: DecodeParams {
            max_tokens: max.map_or(default_max.unwrap_or(usize::MAX), |m| m as usize),
            sampling: SamplingParams {
                temperature,
                top_k: top_k.filter(|&k| k > 0).map(|k| k as usize),
                top_p: top_p.filter(|&p| p < 1.0),
                min_p: min_p.filter(|&p| p > 0.0),
                presence_penalty,
                frequency_penalty,
                repetition_penalty,
                seed,
            },
            stop,
            ignore_eos,
            logprobs: None,
        },
        n,
        stream,
        include_usage,
    })
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// Fields accepted and ignored: they change nothing sinew computes.
const IGNORED: &[&str] = &["user", "metadata", "store", "service_tier"];

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug)]
pub struct ChatRequest {
    /// Shared fields.
    pub common: Common,
    /// The conversation.
    pub messages: Vec<Message>,
    /// `top_logprobs` when `logprobs` is true.
    pub logprobs: Option<usize>,
}

/// Parses a chat request.
///
/// # Errors
/// A 400 naming the field.
pub fn chat(body: &Value) -> Result<ChatRequest, ApiError> {
    let mut f = Fields::new(body)?;
    let common = common(&mut f, None)?;
    let logprobs = f.bool("logprobs")?.unwrap_or(false);
    let top = f.int("top_logprobs", 0, engine::decode::MAX_TOP_LOGPROBS as i64)?;
    if top.is_some() && !logprobs {
        return Err(ApiError::bad(
            Some("top_logprobs".into()),
            "'top_logprobs' needs 'logprobs' set to true",
        ));
    }
    let raw = f
        .get("messages")
        .ok_or_else(|| ApiError::bad(Some("messages".into()), "'messages' is required"))?;
    let list = raw
        .as_array()
        .ok_or_else(|| type_error("messages", "an array", raw))?;
    if list.is_empty() {
        return Err(ApiError::bad(
            Some("messages".into()),
            "'messages' is empty",
        ));
    }
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let at = |k: &str| format!("messages[{i}].{k}");
        let o = m
            .as_object()
            .ok_or_else(|| type_error(&format!("messages[{i}]"), "an object", m))?;
        let role = match o.get("role") {
            Some(Value::String(r)) => r.clone(),
            Some(other) => return Err(type_error(&at("role"), "a string", other)),
            None => {
                return Err(ApiError::bad(
                    Some(at("role")),
                    format!("'{}' is required", at("role")),
                ));
            }
        };
        if !["system", "developer", "user", "assistant"].contains(&role.as_str()) {
            return Err(ApiError::bad(
                Some(at("role")),
                format!("role {role:?} is not supported: system, developer, user or assistant"),
            ));
        }
        let content = match o.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for (j, p) in parts.iter().enumerate() {
                    let kind = p.get("type").and_then(Value::as_str);
                    match (kind, p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => s.push_str(t),
                        _ => {
                            return Err(ApiError::bad_code(
                                &format!("messages[{i}].content[{j}]"),
                                "only text content parts are supported",
                                "unsupported_parameter",
                            ));
                        }
                    }
                }
                s
            }
            None | Some(Value::Null) if role == "assistant" => String::new(),
            Some(other) => {
                return Err(type_error(
                    &at("content"),
                    "a string or a list of text parts",
                    other,
                ));
            }
            None => {
                return Err(ApiError::bad(
                    Some(at("content")),
                    format!("'{}' is required", at("content")),
                ));
            }
        };
        for k in o.keys() {
            if !["role", "content", "name"].contains(&k.as_str()) && !o[k].is_null() {
                return Err(ApiError::bad_code(
                    &at(k),
                    format!("'{}' is not supported by this server", at(k)),
                    "unsupported_parameter",
                ));
            }
        }
        let role = if role == "developer" {
            "system".into()
        } else {
            role
        };
        messages.push(Message { role, content });
    }
    f.finish(IGNORED)?;
    Ok(ChatRequest {
        common,
        messages,
        logprobs: logprobs.then_some(top.unwrap_or(0) as usize),
    })
}

/// One prompt of a completion request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// Text, tokenized by the server.
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
}

/// `POST /v1/completions`.
#[derive(Clone, Debug)]
pub struct CompletionRequest {
    /// Shared fields.
    pub common: Common,
    /// The prompts.
    pub prompts: Vec<Prompt>,
    /// Return the prompt before the completion (and its logprobs, with `logprobs`).
    pub echo: bool,
    /// Logprobs with this many alternatives.
    pub logprobs: Option<usize>,
}

fn ids(v: &[Value], name: &str) -> Result<Vec<u32>, ApiError> {
    v.iter()
        .map(|x| {
            x.as_u64()
                .filter(|&t| t <= u64::from(u32::MAX))
                .map(|t| t as u32)
                .ok_or_else(|| type_error(name, "a list of token ids", x))
        })
        .collect()
}

/// Parses a completion request.
///
/// # Errors
/// A 400 naming the field.
pub fn completion(body: &Value) -> Result<CompletionRequest, ApiError> {
    let mut f = Fields::new(body)?;
    let common = common(&mut f, Some(16))?;
    let echo = f.bool("echo")?.unwrap_or(false);
    let logprobs = f
        .int("logprobs", 0, engine::decode::MAX_TOP_LOGPROBS as i64)?
        .map(|n| n as usize);
    let best_of = f.int("best_of", 1, MAX_N as i64)?;
    if best_of.is_some_and(|b| b as usize != common.n && b != 1) {
        return Err(ApiError::bad_code(
            "best_of",
            "'best_of' other than 1 or n is not supported by this server",
            "unsupported_parameter",
        ));
    }
    if f.string("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_code(
            "suffix",
            "'suffix' is not supported by this server",
            "unsupported_parameter",
        ));
    }
    let raw = f
        .get("prompt")
        .ok_or_else(|| ApiError::bad(Some("prompt".into()), "'prompt' is required"))?;
    let prompts = match raw {
        Value::String(s) => vec![Prompt::Text(s.clone())],
        Value::Array(a) if a.is_empty() => {
            return Err(ApiError::bad(Some("prompt".into()), "'prompt' is empty"));
        }
        Value::Array(a) => match &a[0] {
            Value::String(_) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(|s| Prompt::Text(s.to_string()))
                        .ok_or_else(|| type_error("prompt", "a list of strings", x))
                })
                .collect::<Result<_, _>>()?,
            Value::Number(_) => vec![Prompt::Ids(ids(a, "prompt")?)],
            Value::Array(_) => a
                .iter()
                .map(|x| match x {
                    Value::Array(inner) => Ok(Prompt::Ids(ids(inner, "prompt")?)),
                    other => Err(type_error("prompt", "a list of token id lists", other)),
                })
                .collect::<Result<_, _>>()?,
            other => {
                return Err(type_error(
                    "prompt",
                    "a string, a list of strings, a list of token ids or a list of such lists",
                    other,
                ));
            }
        },
        other => {
            return Err(type_error(
                "prompt",
                "a string, a list of strings, a list of token ids or a list of such lists",
                other,
            ));
        }
    };
    if prompts.len() * common.n > 64 {
        return Err(ApiError::bad(
            Some("prompt".into()),
            "at most 64 choices (prompts × n) per request",
        ));
    }
    f.finish(IGNORED)?;
    Ok(CompletionRequest {
        common,
        prompts,
        echo,
        logprobs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn every_error_names_its_field() {
        let cases = [
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}),
                "temperature",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}),
                "tools",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": 5}]}),
                "messages[0].content",
            ),
            (json!({"model": "m", "messages": []}), "messages"),
            (json!({"model": "m"}), "messages"),
            (
                json!({"messages": [{"role": "user", "content": "hi"}]}),
                "model",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}),
                "top_logprobs",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 0}),
                "n",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}),
                "stop",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": true}}),
                "stream_options",
            ),
        ];
        for (body, field) in cases {
            let e = chat(&body).unwrap_err();
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {e:?}");
        }
    }

    #[test]
    fn nulls_and_empty_unsupported_fields_are_absent() {
        let r = chat(
            &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tools": null, "logit_bias": {}, "temperature": null, "user": "u"}),
        )
        .unwrap();
        assert_eq!(r.common.params.sampling.temperature, 1.0);
    }

    #[test]
    fn completion_prompts_in_every_form() {
        let p = |v: Value| {
            completion(&json!({"model": "m", "prompt": v}))
                .unwrap()
                .prompts
        };
        assert_eq!(p(json!("a")), vec![Prompt::Text("a".into())]);
        assert_eq!(p(json!(["a", "b"])).len(), 2);
        assert_eq!(p(json!([1, 2, 3])), vec![Prompt::Ids(vec![1, 2, 3])]);
        assert_eq!(
            p(json!([[1], [2, 3]])),
            vec![Prompt::Ids(vec![1]), Prompt::Ids(vec![2, 3])]
        );
        assert!(completion(&json!({"model": "m", "prompt": [1, "a"]})).is_err());
        assert!(completion(&json!({"model": "m", "prompt": {}})).is_err());
        let r = completion(
            &json!({"model": "m", "prompt": "x", "max_tokens": 0, "echo": true, "logprobs": 1}),
        )
        .unwrap();
        assert_eq!(r.common.params.max_tokens, 0);
        assert_eq!(r.logprobs, Some(1));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_json_never_panics(s in ".{0,200}") {
            if let Ok(v) = serde_json::from_str::<Value>(&s) {
                let _ = chat(&v);
                let _ = completion(&v);
            }
        }

        #[test]
        fn arbitrary_field_values_never_panic(
            key in proptest::sample::select(vec!["model", "messages", "temperature", "top_p", "n", "stop", "seed", "max_tokens", "logprobs", "top_logprobs", "stream", "stream_options", "prompt", "echo", "best_of", "suffix"]),
            val in any::<i64>().prop_map(Value::from),
        ) {
            let mut b = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "prompt": "x"});
            b[key] = val.clone();
            let _ = chat(&b);
            let _ = completion(&b);
            b[key] = json!([val, "s", null, {"a": 1}]);
            let _ = chat(&b);
            let _ = completion(&b);
        }
    }
}
