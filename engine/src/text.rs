//! Text in and out: the tokenizer (tokenizers crate), the chat template (minijinja), stop
//! conditions, and incremental detokenization for streaming.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use serde::Serialize;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// One chat message.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    /// "system", "user", "assistant", …
    pub role: String,
    /// The message text.
    pub content: String,
}

/// A model's tokenizer, chat template and end-of-sequence tokens.
pub struct Text {
    tokenizer: Tokenizer,
    template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// A special-token field of tokenizer_config.json: a string or `{"content": ...}`.
fn token_field(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::config(path, format!("not valid JSON: {e}")))
}

impl Text {
    /// Loads tokenizer.json, tokenizer_config.json (special tokens, chat template),
    /// chat_template.jinja if present, and generation_config.json (end-of-sequence ids) from a
    /// Hugging Face model directory. `config_eos` are the ids config.json names.
    pub fn from_hf_dir(dir: &Path, config_eos: &[u32]) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(Error::io(
                &tok_path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the model has no tokenizer.json",
                ),
            ));
        }
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::config(&tok_path, format!("not a valid tokenizer: {e}")))?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc = read_json(&tc_path)?.unwrap_or(Value::Null);
        let mut template = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default", else the first.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        }
        let bos_token = token_field(&tc, "bos_token");
        let eos_token = token_field(&tc, "eos_token");
        let mut eos_ids = config_eos.to_vec();
        let gen_path = dir.join("generation_config.json");
        if let Some(g) = read_json(&gen_path)? {
            match g.get("eos_token_id") {
                Some(Value::Array(a)) => {
                    eos_ids.extend(a.iter().filter_map(Value::as_u64).map(|x| x as u32))
                }
                Some(x) => eos_ids.extend(x.as_u64().map(|x| x as u32)),
                None => {}
            }
        }
        if let Some(t) = &eos_token
            && let Some(id) = tokenizer.token_to_id(t)
        {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(Text {
            tokenizer,
            template,
            bos_token,
            eos_token,
            eos_ids,
        })
    }

    /// Builds the tokenizer from GGUF metadata: the embedded Hugging Face tokenizer
    /// (`tokenizer.huggingface.json`) when present, else llama.cpp's vocabulary and merges; the
    /// chat template from `tokenizer.chat_template`.
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let md = &content.metadata;
        let tokenizer = match md.get("tokenizer.huggingface.json") {
            Some(v) => {
                let s = v
                    .to_string()
                    .map_err(|e| Error::config(path, format!("tokenizer.huggingface.json: {e}")))?;
                Tokenizer::from_bytes(s.as_bytes()).map_err(|e| {
                    Error::config(path, format!("embedded tokenizer.huggingface.json: {e}"))
                })?
            }
            None => Tokenizer::from_gguf(content)
                .map_err(|e| Error::config(path, format!("GGUF tokenizer: {e}")))?,
        };
        let string = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
        let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let token = |i: Option<u32>| i.and_then(|i| tokenizer.id_to_token(i));
        let eos_ids: Vec<u32> = id("tokenizer.ggml.eos_token_id").into_iter().collect();
        Ok(Text {
            bos_token: token(id("tokenizer.ggml.bos_token_id")),
            eos_token: token(eos_ids.first().copied()),
            template: string("tokenizer.chat_template"),
            tokenizer,
            eos_ids,
        })
    }

    /// The underlying tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template source, if the model has one.
    pub fn template(&self) -> Option<&str> {
        self.template.as_deref()
    }

    /// The beginning-of-sequence token's id, when the model names one.
    pub fn bos_id(&self) -> Option<u32> {
        self.tokenizer.token_to_id(self.bos_token.as_deref()?)
    }

    /// Token ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Tokenizes `text`; special tokens written in the text (e.g. `<|im_start|>`) are recognized.
    /// `add_special` adds the tokenizer's own BOS/EOS decorations.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, add_special)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Detokenizes, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(tok_err)
    }

    /// Renders the chat template over `messages`, ending with the assistant's turn opener when
    /// `add_generation_prompt`.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let source = self.template.as_deref().ok_or_else(|| {
            Error::Template("the model has no chat template; use a raw prompt".into())
        })?;
        render_template(
            source,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
    }
}

/// Renders a Hugging Face chat template with the variables and helpers transformers provides
/// (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, Python
/// string methods).
pub fn render_template(
    source: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", source)
        .map_err(|e| Error::Template(format!("does not parse: {e}")))?;
    let t = env
        .get_template("chat")
        .map_err(|e| Error::Template(e.to_string()))?;
    t.render(minijinja::context! {
        messages => minijinja::value::Serde(messages),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| Error::Template(format!("rendering failed: {e}")))
}

/// Turns a growing list of token ids into text deltas, holding back bytes that do not yet form
/// whole characters and text that might be the start of a stop string.
///
/// Each token costs work for the few ids not yet settled, not for the whole sequence: the text is
/// decoded window by window (the last settled ids as context, so tokenizers that drop or merge a
/// leading space decode as they would in the whole sequence), and stop strings are looked for
/// only where a new match could begin.
pub struct Detokenizer {
    ids: Vec<u32>,
    /// The text of `ids[..read]`.
    text: String,
    /// `ids[prefix..read]` are settled ids decoded again as context for the pending
    /// `ids[read..]`.
    prefix: usize,
    read: usize,
    /// Bytes of `text` shown so far.
    emitted: usize,
    /// Bytes of `text` already searched for stop strings without a match.
    searched: usize,
    stops: Vec<String>,
}

/// What one new token did to the text.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Text that can be shown now (possibly empty).
    Text(String),
    /// A stop string appeared; the text before it that was not yet shown.
    Stop(String),
}

impl Detokenizer {
    /// A detokenizer that stops at any of `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Detokenizer {
            ids: Vec::new(),
            text: String::new(),
            prefix: 0,
            read: 0,
            emitted: 0,
            searched: 0,
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
        }
    }

    /// The whole text so far, up to any stop string.
    pub fn text(&self, text: &Text) -> Result<String> {
        let s = text.decode(&self.ids)?;
        Ok(match first_stop(&self.stops, &s, 0) {
            Some(i) => s[..i].to_string(),
            None => s,
        })
    }

    /// Settles the pending ids into `self.text` when they decode to whole characters (an
    /// incomplete UTF-8 sequence decodes to U+FFFD at the end), or always with `flush`.
    fn settle(&mut self, text: &Text, flush: bool) -> Result<()> {
        let before = text.decode(&self.ids[self.prefix..self.read])?;
        let now = text.decode(&self.ids[self.prefix..])?;
        if !flush && now.ends_with('\u{FFFD}') {
            return Ok(());
        }
        match now.strip_prefix(before.as_str()) {
            Some(new) => self.text.push_str(new),
            // the context decodes differently once followed by more ids: decode everything
            // again (keeping what was shown, which only ever ends on a settled prefix)
            None => {
                let all = text.decode(&self.ids)?;
                self.text = if all.starts_with(&self.text[..self.emitted]) {
                    all
                } else {
                    let mut t = self.text[..self.emitted].to_string();
                    t.push_str(all.get(self.emitted..).unwrap_or(""));
                    t
                };
                self.searched = self.searched.min(self.emitted);
            }
        }
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(())
    }

    /// Adds a token and returns what became showable.
    pub fn push(&mut self, text: &Text, id: u32) -> Result<Step> {
        self.ids.push(id);
        self.settle(text, false)?;
        if let Some(step) = self.stop() {
            return Ok(step);
        }
        let s = &self.text;
        // Hold back a suffix that could begin a stop string.
        let hold = self
            .stops
            .iter()
            .map(|p| {
                (1..p.len())
                    .rev()
                    .find(|&n| p.is_char_boundary(n) && s.ends_with(&p[..n]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let end = s.len() - hold;
        if end <= self.emitted || !s.is_char_boundary(end) || !s.is_char_boundary(self.emitted) {
            return Ok(Step::Text(String::new()));
        }
        let out = s[self.emitted..end].to_string();
        self.emitted = end;
        Ok(Step::Text(out))
    }

    /// A stop string in the text added since the last search: the unshown text before it.
    fn stop(&mut self) -> Option<Step> {
        let longest = self.stops.iter().map(String::len).max()?;
        // a match not found before ends in the new text, so starts at most `longest - 1` bytes
        // before it
        let mut from = self.searched.saturating_sub(longest - 1);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.searched = self.text.len();
        let i = first_stop(&self.stops, &self.text, from)?;
        let out = self
            .text
            .get(self.emitted.min(i)..i)
            .unwrap_or("")
            .to_string();
        self.emitted = i;
        Some(Step::Stop(out))
    }

    /// Text held back at the end of generation (no stop string came while streaming; one in the
    /// ids that never settled into whole characters still cuts the text).
    pub fn finish(&mut self, text: &Text) -> Result<String> {
        self.settle(text, true)?;
        if let Some(Step::Stop(out) | Step::Text(out)) = self.stop() {
            return Ok(out);
        }
        let out = self.text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = self.text.len();
        Ok(out)
    }
}

/// Where the first of `stops` occurs in `s[from..]`, as an index into `s`.
fn first_stop(stops: &[String], s: &str, from: usize) -> Option<usize> {
    stops
        .iter()
        .filter_map(|p| s[from..].find(p.as_str()))
        .min()
        .map(|i| from + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin() -> Text {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3_moe_gqa");
        Text::from_hf_dir(&dir, &[]).unwrap()
    }

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn chat_template_renders_with_and_without_the_generation_prompt() {
        let t = builtin();
        let m = [msg("system", "be brief"), msg("user", "hi")];
        let with = t.render_chat(&m, true).unwrap();
        assert_eq!(
            with,
            "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let without = t.render_chat(&m, false).unwrap();
        assert!(!without.ends_with("assistant\n"));
        // special tokens in the rendered text become single ids
        let ids = t.encode(&with, false).unwrap();
        assert_eq!(ids[0], 1);
        assert!(ids.contains(&2));
        assert_eq!(t.eos_ids(), &[2]);
    }

    #[test]
    fn templates_get_python_methods_and_raise_exception() {
        let src = "{% for m in messages %}{% if m.role not in ['user'] %}{{ raise_exception('only users') }}{% endif %}{{ m.content.strip().upper() }}{% endfor %}";
        assert_eq!(
            render_template(src, &[msg("user", "  hey ")], false, "", "").unwrap(),
            "HEY"
        );
        let e = render_template(src, &[msg("tool", "x")], false, "", "").unwrap_err();
        assert!(e.to_string().contains("only users"), "{e}");
        assert!(render_template("{% for %}", &[], false, "", "").is_err());
    }

    /// Streams `ids` through a detokenizer with `stops`: the text shown.
    fn stream(t: &Text, ids: &[u32], stops: &[String]) -> String {
        let mut d = Detokenizer::new(stops);
        let mut shown = String::new();
        for &id in ids {
            match d.push(t, id).unwrap() {
                Step::Text(s) => shown.push_str(&s),
                Step::Stop(s) => return shown + &s,
            }
        }
        shown + &d.finish(t).unwrap()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Any ids (byte tokens that split characters, special tokens) stream to exactly the
        /// text the whole sequence decodes to; with a stop string taken from that text, exactly
        /// the text before its first occurrence is shown.
        #[test]
        fn streamed_text_is_the_decoded_text_up_to_the_first_stop(
            ids in proptest::collection::vec(0u32..384, 0..80),
            cut in (0usize..1000, 1usize..6),
        ) {
            let t = builtin();
            let full = t.decode(&ids).unwrap();
            let shown = stream(&t, &ids, &[]);
            proptest::prop_assert_eq!(&shown, &full);
            let chars: Vec<(usize, char)> = full.char_indices().collect();
            if !chars.is_empty() {
                let a = cut.0 % chars.len();
                let b = (a + cut.1).min(chars.len());
                let end = chars.get(b).map_or(full.len(), |c| c.0);
                let stop = full[chars[a].0..end].to_string();
                let want = &full[..full.find(&stop).unwrap()];
                let shown = stream(&t, &ids, std::slice::from_ref(&stop));
                proptest::prop_assert_eq!(shown.as_str(), want, "stop {:?}", stop);
            }
        }
    }

    #[test]
    fn detokenizer_streams_whole_text_and_stops_at_stop_strings() {
        let t = builtin();
        let ids = t.encode("hello brown fox, the end", false).unwrap();
        // without stops, the streamed pieces add up to the decoded text
        let mut d = Detokenizer::new(&[]);
        let mut streamed = String::new();
        for &id in &ids {
            match d.push(&t, id).unwrap() {
                Step::Text(s) => streamed.push_str(&s),
                Step::Stop(_) => panic!("no stop strings"),
            }
        }
        streamed.push_str(&d.finish(&t).unwrap());
        assert_eq!(streamed, t.decode(&ids).unwrap());

        // a stop string that spans tokens: nothing of it is ever shown
        let mut d = Detokenizer::new(&["fox,".to_string()]);
        let mut streamed = String::new();
        let mut stopped = false;
        for &id in &ids {
            match d.push(&t, id).unwrap() {
                Step::Text(s) => streamed.push_str(&s),
                Step::Stop(s) => {
                    streamed.push_str(&s);
                    stopped = true;
                    break;
                }
            }
        }
        assert!(stopped);
        assert_eq!(streamed, "hello brown ");
        assert_eq!(d.text(&t).unwrap(), "hello brown ");
    }
}
