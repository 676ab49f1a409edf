//! Prometheus text exposition format (version 0.0.4) parser.
//!
//! One pass over the bytes of the body, line by line. Every line is validated; only
//! the samples the caller wants are materialised, so skipping unwanted series costs
//! no allocation. Label values are unescaped into an owned string only when they hold
//! an escape sequence, otherwise they borrow from the body.
//!
//! Where Prometheus' own parsers differ or are loose, this one decides as follows:
//! - Values follow Go's `strconv.ParseFloat` over decimal literals: `NaN` (unsigned)
//!   and `[+-]Inf` / `[+-]Infinity`, all case-insensitive, are accepted; a signed NaN,
//!   a hexadecimal float and a finite literal that overflows `f64` (`1e400`) are not.
//! - Timestamps are integer milliseconds with an optional sign.
//! - Label values accept only the escapes `\\`, `\"` and `\n`.
//! - `# TYPE` needs one of `counter`, `gauge`, `histogram`, `summary`, `untyped`
//!   (lowercase); `# HELP` and `# TYPE` need a metric name; HELP text is not checked.
//! - Prometheus 3 quoted names are read: `{"my.metric", "my.label"="v"} 1`, and in
//!   `# HELP` / `# TYPE`. Because names are returned borrowed, a quoted name holding
//!   an escape sequence is rejected.
//! - Spaces and tabs are the only blanks; they may surround `{`, `}`, `,` and `=`, and
//!   may start or end any line. A trailing `\r` (CRLF line ends) is dropped.

use std::borrow::Cow;

/// One sample line of an exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    /// Metric name, e.g. `project_vcpu_usage`.
    pub name: &'a str,
    /// The series as the body wrote it (`name{labels}`, escapes and all; empty where
    /// the sample did not come from text).
    pub series: &'a str,
    /// Label pairs in the order they appeared; values are unescaped.
    pub labels: Vec<(&'a str, Cow<'a, str>)>,
    /// Sample value (may be NaN or ±Inf).
    pub value: f64,
    /// Optional timestamp in milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
}

/// What a successful parse saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParseStats {
    /// Sample lines in the body (wanted or not).
    pub samples: usize,
    /// Sample lines handed to the callback.
    pub wanted: usize,
    /// Wanted lines whose series was found by its place in the last body of the
    /// target (see `super::text::Layout`), counted by the caller.
    pub matched: usize,
}

/// Why a body could not be parsed: the first bad line, 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}: {excerpt:?}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
    /// The start of the line (at most 120 characters).
    pub excerpt: String,
}

/// How many characters of a bad line an error quotes.
pub const EXCERPT_CHARS: usize = 120;

/// Metric types a `# TYPE` line may name.
const METRIC_TYPES: [&str; 5] = ["counter", "gauge", "histogram", "summary", "untyped"];

/// Parses a whole exposition body. `want` is asked with each sample's metric name;
/// only wanted samples are materialised and passed to `on_sample`, but every line is
/// validated: the first malformed line fails the whole body.
pub fn parse<'a>(
    text: &'a str,
    want: impl FnMut(&str) -> bool,
    on_sample: impl FnMut(Sample<'a>),
) -> Result<ParseStats, ParseError> {
    parse_with_known(text, want, |_, _, _| false, on_sample)
}

/// [`parse`], offering each wanted sample first to `known` as its series text as
/// written (`name{labels}`, see [`RawSample`]), value and timestamp: when `known`
/// takes it (`true`), its labels are not unescaped and `on_sample` does not see it.
/// Every line is validated all the same.
pub fn parse_with_known<'a>(
    text: &'a str,
    mut want: impl FnMut(&str) -> bool,
    mut known: impl FnMut(&'a str, f64, Option<i64>) -> bool,
    mut on_sample: impl FnMut(Sample<'a>),
) -> Result<ParseStats, ParseError> {
    let bytes = text.as_bytes();
    let mut stats = ParseStats::default();
    // Reused from line to line, so that validating a line allocates nothing.
    let mut scratch = Scratch::default();
    let mut start = 0;
    let mut number = 0;
    while start < bytes.len() {
        let end = find_byte(bytes, start, b'\n').unwrap_or(bytes.len());
        number += 1;
        // `start` and `end` sit next to '\n' bytes (or the ends of the text), so they
        // are char boundaries.
        let line = &text[start..end];
        start = end + 1;
        let sample = match parse_line(line, &mut scratch) {
            Ok(Some(sample)) => sample,
            Ok(None) => continue,
            Err(reason) => return Err(ParseError::new(number, reason, line)),
        };
        stats.samples += 1;
        if want(sample.name) {
            stats.wanted += 1;
            if known(sample.series, sample.value, sample.timestamp_ms) {
                continue;
            }
            on_sample(Sample {
                series: sample.series,
                name: sample.name,
                labels: scratch.labels.iter().map(RawLabel::materialise).collect(),
                value: sample.value,
                timestamp_ms: sample.timestamp_ms,
            });
        }
    }
    Ok(stats)
}

impl ParseError {
    fn new(line: usize, reason: String, text: &str) -> Self {
        let text = text.strip_suffix('\r').unwrap_or(text);
        Self {
            line,
            reason,
            excerpt: text.chars().take(EXCERPT_CHARS).collect(),
        }
    }
}

/// Buffers kept across lines.
#[derive(Default)]
struct Scratch<'a> {
    /// The labels of the current line, still escaped.
    labels: Vec<RawLabel<'a>>,
    /// Label names, sorted to find duplicates among many labels.
    names: Vec<&'a str>,
}

/// A validated label pair whose value is still escaped.
struct RawLabel<'a> {
    name: &'a str,
    value: &'a str,
    escaped: bool,
}

impl<'a> RawLabel<'a> {
    fn materialise(&self) -> (&'a str, Cow<'a, str>) {
        let value = if self.escaped {
            Cow::Owned(unescape(self.value))
        } else {
            Cow::Borrowed(self.value)
        };
        (self.name, value)
    }
}

/// A validated sample line; its labels are in `Scratch::labels`.
struct RawSample<'a> {
    name: &'a str,
    /// The series as written: the name and the label set with its braces, as the
    /// line spells them (no blanks around).
    series: &'a str,
    value: f64,
    timestamp_ms: Option<i64>,
}

/// Reads one line (without its '\n'): `None` for blank, comment, HELP and TYPE lines.
fn parse_line<'a>(
    line: &'a str,
    scratch: &mut Scratch<'a>,
) -> Result<Option<RawSample<'a>>, String> {
    let bytes = line.as_bytes();
    let mut end = bytes.len();
    while end > 0 && matches!(bytes[end - 1], b' ' | b'\t' | b'\r') {
        end -= 1;
    }
    let mut cur = Cursor {
        // Only ASCII bytes were cut off, so `end` is a char boundary.
        line: &line[..end],
        pos: 0,
    };
    cur.skip_blanks();
    match cur.peek() {
        None => Ok(None),
        Some(b'#') => {
            cur.pos += 1;
            cur.meta_line().map(|()| None)
        }
        Some(_) => cur.sample(scratch).map(Some),
    }
}

/// A position in one line, trailing blanks already cut off.
///
/// Every position the cursor stops at is next to an ASCII byte or at an end of the
/// line, hence a char boundary: slicing `line` with them cannot panic.
struct Cursor<'a> {
    line: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.line.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.line.len()
    }

    fn skip_blanks(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    /// Takes `byte` if it is next.
    fn eat(&mut self, byte: u8) -> bool {
        let found = self.peek() == Some(byte);
        self.pos += usize::from(found);
        found
    }

    /// Describes what is next, for error messages.
    fn found(&self) -> String {
        match self.line[self.pos..].chars().next() {
            Some(c) => format!("found {c:?}"),
            None => "found end of line".to_owned(),
        }
    }

    /// Takes bytes up to the next blank or the end of the line.
    fn token(&mut self) -> &'a str {
        let start = self.pos;
        while !matches!(self.peek(), None | Some(b' ' | b'\t')) {
            self.pos += 1;
        }
        &self.line[start..self.pos]
    }

    /// Takes bytes of class `rest` after one of class `first`, if there is one.
    fn name(&mut self, first: u8, rest: u8) -> Option<&'a str> {
        let bytes = self.bytes();
        let in_class = |at: usize, class: u8| {
            bytes
                .get(at)
                .is_some_and(|&b| CLASS[usize::from(b)] & class != 0)
        };
        let start = self.pos;
        if !in_class(start, first) {
            return None;
        }
        let mut end = start + 1;
        while in_class(end, rest) {
            end += 1;
        }
        self.pos = end;
        Some(&self.line[start..end])
    }

    /// Takes an unquoted metric name.
    fn metric_name(&mut self) -> Result<&'a str, String> {
        self.name(METRIC_START, METRIC_REST)
            .ok_or_else(|| format!("expected metric name, {}", self.found()))
    }

    /// Takes a quoted name, the opening quote next.
    fn quoted_name(&mut self) -> Result<&'a str, String> {
        self.pos += 1;
        let (name, escaped) = self.quoted("quoted name")?;
        if escaped {
            return Err("escape sequences in quoted names are not supported".to_owned());
        }
        if name.is_empty() {
            return Err("empty quoted name".to_owned());
        }
        Ok(name)
    }

    /// Takes the rest of a quoted string, the opening quote already taken. Returns
    /// the raw contents and whether they hold escapes.
    fn quoted(&mut self, what: &str) -> Result<(&'a str, bool), String> {
        let bytes = self.bytes();
        let start = self.pos;
        let mut escaped = false;
        let mut at = start;
        loop {
            let Some(i) = find_quote_or_backslash(bytes, at) else {
                return Err(format!("unterminated {what}"));
            };
            if bytes[i] == b'"' {
                self.pos = i + 1;
                return Ok((&self.line[start..i], escaped));
            }
            match bytes.get(i + 1) {
                Some(b'\\' | b'"' | b'n') => {
                    escaped = true;
                    at = i + 2;
                }
                None => return Err(format!("unterminated {what}")),
                Some(_) => {
                    let c = self.line[i + 1..].chars().next().unwrap_or_default();
                    return Err(format!(
                        "invalid escape sequence \\{c} in {what} (only \\\\, \\\" and \\n)"
                    ));
                }
            }
        }
    }

    /// Reads the rest of a line starting with '#'.
    fn meta_line(&mut self) -> Result<(), String> {
        self.skip_blanks();
        let rest = &self.line[self.pos..];
        let keyword = if rest.starts_with("HELP") {
            "HELP"
        } else if rest.starts_with("TYPE") {
            "TYPE"
        } else {
            return Ok(());
        };
        self.pos += keyword.len();
        if !matches!(self.peek(), None | Some(b' ' | b'\t')) {
            // `# HELPFUL remark` is a plain comment.
            return Ok(());
        }
        self.skip_blanks();
        let name = if self.peek() == Some(b'"') {
            self.quoted_name()
        } else {
            self.metric_name()
        }
        .map_err(|reason| format!("{reason} after {keyword}"))?;
        if !matches!(self.peek(), None | Some(b' ' | b'\t')) {
            return Err(format!(
                "invalid metric name in {keyword} line: {} after {name:?}",
                self.found()
            ));
        }
        self.skip_blanks();
        if keyword == "TYPE" {
            match &self.line[self.pos..] {
                "" => return Err(format!("missing metric type for {name:?}")),
                kind if !METRIC_TYPES.contains(&kind) => {
                    return Err(format!(
                        "invalid metric type {kind:?} (expected one of {})",
                        METRIC_TYPES.join(", ")
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Reads a sample line; its labels go to `scratch.labels`.
    fn sample(&mut self, scratch: &mut Scratch<'a>) -> Result<RawSample<'a>, String> {
        scratch.labels.clear();
        let from = self.pos;
        let mut to = self.pos;
        let mut name = None;
        if self.peek() != Some(b'{') {
            let plain = self.metric_name()?;
            if !matches!(self.peek(), None | Some(b' ' | b'\t' | b'{')) {
                return Err(format!(
                    "invalid character in metric name, {}",
                    self.found()
                ));
            }
            name = Some(plain);
            to = self.pos;
            self.skip_blanks();
        }
        if self.eat(b'{') {
            self.label_set(&mut name, &mut scratch.labels)?;
            check_duplicates(&scratch.labels, &mut scratch.names)?;
            to = self.pos;
            self.skip_blanks();
        }
        let name = name.ok_or("missing metric name (a quoted name inside the braces)")?;
        let value = self.token();
        if value.is_empty() {
            return Err("missing value".to_owned());
        }
        let value = parse_value(value)?;
        self.skip_blanks();
        let timestamp_ms = if self.at_end() {
            None
        } else {
            let token = self.token();
            let ms = token
                .parse::<i64>()
                .map_err(|_| format!("invalid timestamp {token:?} (integer milliseconds)"))?;
            self.skip_blanks();
            if !self.at_end() {
                return Err(format!("unexpected text after timestamp, {}", self.found()));
            }
            Some(ms)
        };
        Ok(RawSample {
            name,
            series: &self.line[from..to],
            value,
            timestamp_ms,
        })
    }

    /// Reads labels up to and including '}', the '{' already taken. A quoted string
    /// standing alone is the metric name (Prometheus 3).
    fn label_set(
        &mut self,
        name: &mut Option<&'a str>,
        labels: &mut Vec<RawLabel<'a>>,
    ) -> Result<(), String> {
        loop {
            self.skip_blanks();
            let (item, quoted) = match self.peek() {
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(b'"') => (self.quoted_name()?, true),
                _ => match self.name(LABEL_START, LABEL_REST) {
                    Some(label) => (label, false),
                    None => return Err(format!("expected label name or '}}', {}", self.found())),
                },
            };
            self.skip_blanks();
            if quoted && matches!(self.peek(), Some(b',' | b'}')) {
                if let Some(first) = name.replace(item) {
                    return Err(format!("metric name {first:?} given twice"));
                }
            } else {
                if !self.eat(b'=') {
                    return Err(format!(
                        "expected '=' after label name {item:?}, {}",
                        self.found()
                    ));
                }
                self.skip_blanks();
                if !self.eat(b'"') {
                    return Err(format!(
                        "expected '\"' to open the value of label {item:?}, {}",
                        self.found()
                    ));
                }
                let (value, escaped) = self.quoted("label value")?;
                labels.push(RawLabel {
                    name: item,
                    value,
                    escaped,
                });
                self.skip_blanks();
            }
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => {
                    return Err(format!(
                        "expected ',' or '}}' after label {item:?}, {}",
                        self.found()
                    ));
                }
            }
        }
    }
}

/// Fails on the first label name given twice.
fn check_duplicates<'a>(labels: &[RawLabel<'a>], names: &mut Vec<&'a str>) -> Result<(), String> {
    // Pairwise comparison beats sorting for the handful of labels series usually have.
    const PAIRWISE_UP_TO: usize = 16;
    let duplicate = if labels.len() <= PAIRWISE_UP_TO {
        labels
            .iter()
            .enumerate()
            .find(|(i, label)| labels[..*i].iter().any(|l| l.name == label.name))
            .map(|(_, label)| label.name)
    } else {
        names.clear();
        names.extend(labels.iter().map(|l| l.name));
        names.sort_unstable();
        names.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
    };
    match duplicate {
        Some(name) => Err(format!("duplicate label name {name:?}")),
        None => Ok(()),
    }
}

/// Parses a sample value the way Go's `strconv.ParseFloat` does, hex floats aside.
fn parse_value(token: &str) -> Result<f64, String> {
    let invalid = || format!("invalid value {token:?}");
    // Rust also reads "+NaN" and "-NaN", and makes an overflowing literal infinite
    // where Go reports an error: both are checked after the fact.
    let value: f64 = token.parse().map_err(|_| invalid())?;
    if value.is_nan() && !token.eq_ignore_ascii_case("nan") {
        return Err(invalid());
    }
    if value.is_infinite() {
        let digits = token.trim_start_matches(['+', '-']);
        if !digits.eq_ignore_ascii_case("inf") && !digits.eq_ignore_ascii_case("infinity") {
            return Err(format!("value {token:?} out of range"));
        }
    }
    Ok(value)
}

/// Undoes the label value escapes `\\`, `\"` and `\n` (already validated).
fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let mut after = rest[i + 1..].chars();
        match after.next() {
            Some('n') => out.push('\n'),
            Some(c) => out.push(c),
            // Cannot happen after validation; keeping the backslash is harmless.
            None => out.push('\\'),
        }
        rest = after.as_str();
    }
    out.push_str(rest);
    out
}

const METRIC_START: u8 = 1;
const METRIC_REST: u8 = 2;
const LABEL_START: u8 = 4;
const LABEL_REST: u8 = 8;

/// Which name positions each byte may take: a bit set of the classes above.
static CLASS: [u8; 256] = {
    let mut class = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let letter = c.is_ascii_alphabetic() || c == b'_';
        let digit = c.is_ascii_digit();
        if letter || c == b':' {
            class[b] |= METRIC_START | METRIC_REST;
        }
        if digit {
            class[b] |= METRIC_REST | LABEL_REST;
        }
        if letter {
            class[b] |= LABEL_START | LABEL_REST;
        }
        b += 1;
    }
    class
};

const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);

/// Marks the zero bytes of `word` with their high bit. Bytes above the first zero
/// may be marked wrongly, so only the lowest mark counts.
fn zero_bytes(word: u64) -> u64 {
    word.wrapping_sub(ONES) & !word & HIGHS
}

/// Position of the first `needle` at or after `from`, eight bytes at a time.
fn find_byte(hay: &[u8], from: usize, needle: u8) -> Option<usize> {
    let pattern = ONES * u64::from(needle);
    find(hay, from, |b| b == needle, |w| zero_bytes(w ^ pattern))
}

/// Position of the first '"' or '\\' at or after `from`.
fn find_quote_or_backslash(hay: &[u8], from: usize) -> Option<usize> {
    find(
        hay,
        from,
        |b| b == b'"' || b == b'\\',
        |w| zero_bytes(w ^ (ONES * u64::from(b'"'))) | zero_bytes(w ^ (ONES * u64::from(b'\\'))),
    )
}

/// Word-at-a-time search: `marks` flags matching bytes of a little-endian word.
fn find(
    hay: &[u8],
    from: usize,
    is_match: impl Fn(u8) -> bool,
    marks: impl Fn(u64) -> u64,
) -> Option<usize> {
    let rest = hay.get(from..)?;
    let mut words = rest.chunks_exact(8);
    let mut offset = from;
    for chunk in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let found = marks(u64::from_le_bytes(word));
        if found != 0 {
            return Some(offset + found.trailing_zeros() as usize / 8);
        }
        offset += 8;
    }
    let tail = words.remainder();
    tail.iter().position(|&b| is_match(b)).map(|i| offset + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `text` wanting every sample.
    fn all(text: &str) -> Result<Vec<Sample<'_>>, ParseError> {
        let mut samples = Vec::new();
        parse(text, |_| true, |s| samples.push(s))?;
        Ok(samples)
    }

    /// Parses a body expected to hold exactly one sample.
    fn one<'a>(case: &str, text: &'a str) -> Sample<'a> {
        let mut samples = all(text).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(samples.len(), 1, "{case}: sample count");
        samples.remove(0)
    }

    fn labels<'s>(sample: &'s Sample<'_>) -> Vec<(&'s str, &'s str)> {
        sample
            .labels
            .iter()
            .map(|(n, v)| (*n, v.as_ref()))
            .collect()
    }

    /// Same value, telling NaN from NaN and -0 from 0.
    fn same(a: f64, b: f64) -> bool {
        (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
    }

    #[test]
    fn sample_lines_yield_name_labels_value_and_timestamp() {
        type Case = (
            &'static str,
            &'static str,
            &'static str,
            &'static [(&'static str, &'static str)],
            f64,
            Option<i64>,
        );
        let cases: &[Case] = &[
            ("no labels", "m 1", "m", &[], 1.0, None),
            ("empty braces", "m{} 1", "m", &[], 1.0, None),
            ("one label", r#"m{a="b"} 2"#, "m", &[("a", "b")], 2.0, None),
            (
                "two labels keep order",
                r#"m{z="1",a="2"} 3"#,
                "m",
                &[("z", "1"), ("a", "2")],
                3.0,
                None,
            ),
            (
                "trailing comma",
                r#"m{a="b",} 1"#,
                "m",
                &[("a", "b")],
                1.0,
                None,
            ),
            (
                "blanks around = , { }",
                "m\t{ a = \"b\" ,\tc=\"d\" , } 1",
                "m",
                &[("a", "b"), ("c", "d")],
                1.0,
                None,
            ),
            (
                "no blank after }",
                r#"m{a="b"}1"#,
                "m",
                &[("a", "b")],
                1.0,
                None,
            ),
            (
                "colons in name",
                "job:rate:5m 0.25",
                "job:rate:5m",
                &[],
                0.25,
                None,
            ),
            ("name starting with _", "_m_1 1", "_m_1", &[], 1.0, None),
            (
                "escaped quote",
                r#"m{a="say \"hi\""} 1"#,
                "m",
                &[("a", "say \"hi\"")],
                1.0,
                None,
            ),
            (
                "escaped backslash",
                r#"m{a="C:\\dir\\"} 1"#,
                "m",
                &[("a", r"C:\dir\")],
                1.0,
                None,
            ),
            (
                "escaped newline",
                r#"m{a="x\ny"} 1"#,
                "m",
                &[("a", "x\ny")],
                1.0,
                None,
            ),
            (
                "separators inside values",
                r#"m{a="x,y}{ =z# w",b=""} 1"#,
                "m",
                &[("a", "x,y}{ =z# w"), ("b", "")],
                1.0,
                None,
            ),
            (
                "utf-8 values",
                r#"m{city="Bielefeld-Süd",mood="🚀",cjk="東京"} 1"#,
                "m",
                &[("city", "Bielefeld-Süd"), ("mood", "🚀"), ("cjk", "東京")],
                1.0,
                None,
            ),
            (
                "escape after utf-8",
                r#"m{a="ü\"ü"} 1"#,
                "m",
                &[("a", "ü\"ü")],
                1.0,
                None,
            ),
            ("NaN", "m NaN", "m", &[], f64::NAN, None),
            ("nan any case", "m nan", "m", &[], f64::NAN, None),
            ("+Inf", "m +Inf", "m", &[], f64::INFINITY, None),
            ("-Inf", "m -Inf", "m", &[], f64::NEG_INFINITY, None),
            ("Inf unsigned", "m Inf", "m", &[], f64::INFINITY, None),
            ("Infinity", "m -infinity", "m", &[], f64::NEG_INFINITY, None),
            ("leading dot", "m .5", "m", &[], 0.5, None),
            ("trailing dot", "m 5.", "m", &[], 5.0, None),
            ("exponent", "m 1e3", "m", &[], 1000.0, None),
            ("signed exponent", "m -2.5E-3", "m", &[], -0.0025, None),
            ("plus sign", "m +7", "m", &[], 7.0, None),
            ("negative zero", "m -0", "m", &[], -0.0, None),
            ("underflow is zero", "m 1e-400", "m", &[], 0.0, None),
            (
                "timestamp",
                "m 1 1700000000000",
                "m",
                &[],
                1.0,
                Some(1_700_000_000_000),
            ),
            (
                "negative timestamp",
                "m 1 -5000",
                "m",
                &[],
                1.0,
                Some(-5000),
            ),
            (
                "timestamp after labels",
                r#"m{a="b"} 1 42"#,
                "m",
                &[("a", "b")],
                1.0,
                Some(42),
            ),
            ("trailing blanks", "m 1 42 \t ", "m", &[], 1.0, Some(42)),
            ("leading blanks", "  m 1", "m", &[], 1.0, None),
            ("crlf", "m 1\r\n", "m", &[], 1.0, None),
            ("final newline", "m 1\n", "m", &[], 1.0, None),
            (
                "histogram bucket",
                r#"x_bucket{le="0.5"} 3"#,
                "x_bucket",
                &[("le", "0.5")],
                3.0,
                None,
            ),
            (
                "histogram +Inf bucket",
                r#"x_bucket{le="+Inf"} 9"#,
                "x_bucket",
                &[("le", "+Inf")],
                9.0,
                None,
            ),
            ("histogram sum", "x_sum 12.5", "x_sum", &[], 12.5, None),
            ("histogram count", "x_count 9", "x_count", &[], 9.0, None),
            (
                "summary quantile",
                r#"x{quantile="0.9"} 1"#,
                "x",
                &[("quantile", "0.9")],
                1.0,
                None,
            ),
            (
                "quoted metric name",
                r#"{"my.metric", a="b"} 1"#,
                "my.metric",
                &[("a", "b")],
                1.0,
                None,
            ),
            (
                "quoted name alone",
                r#"{"my.metric"} 1"#,
                "my.metric",
                &[],
                1.0,
                None,
            ),
            (
                "quoted name after labels",
                r#"{a="b", "my.metric"} 1"#,
                "my.metric",
                &[("a", "b")],
                1.0,
                None,
            ),
            (
                "quoted label name",
                r#"m{"my.label"="v", "ü"="w"} 1"#,
                "m",
                &[("my.label", "v"), ("ü", "w")],
                1.0,
                None,
            ),
        ];
        for &(case, text, name, want_labels, value, timestamp_ms) in cases {
            let sample = one(case, text);
            assert_eq!(sample.name, name, "{case}: name");
            assert_eq!(labels(&sample), want_labels, "{case}: labels");
            assert!(
                same(sample.value, value),
                "{case}: value {} != {value}",
                sample.value
            );
            assert_eq!(sample.timestamp_ms, timestamp_ms, "{case}: timestamp");
        }
    }

    #[test]
    fn malformed_lines_name_the_line_and_the_problem() {
        let cases: &[(&str, &str, usize, &str)] = &[
            ("missing value", "a 1\nm", 2, "missing value"),
            (
                "missing value after labels",
                "a 1\n\nm{a=\"b\"}",
                3,
                "missing value",
            ),
            (
                "unterminated quote",
                "a 1\nm{a=\"b} 1",
                2,
                "unterminated label value",
            ),
            (
                "raw newline in value",
                "m{a=\"b\nc\"} 1",
                1,
                "unterminated label value",
            ),
            (
                "backslash at end",
                "m{a=\"b\\",
                1,
                "unterminated label value",
            ),
            (
                "bad escape",
                "a 1\nm{a=\"\\x\"} 1",
                2,
                "invalid escape sequence \\x",
            ),
            (
                "bad escape utf-8",
                "m{a=\"\\ü\"} 1",
                1,
                "invalid escape sequence \\ü",
            ),
            (
                "tab escape",
                "m{a=\"\\t\"} 1",
                1,
                "invalid escape sequence \\t",
            ),
            (
                "label name starts with digit",
                "m{1a=\"b\"} 1",
                1,
                "expected label name",
            ),
            (
                "label name with colon",
                "m{a:b=\"c\"} 1",
                1,
                "expected '=' after label name \"a\"",
            ),
            (
                "missing =",
                "m{a \"b\"} 1",
                1,
                "expected '=' after label name \"a\"",
            ),
            (
                "unquoted value",
                "m{a=b} 1",
                1,
                "expected '\"' to open the value",
            ),
            ("missing }", "m{a=\"b\" 1", 1, "expected ',' or '}'"),
            ("lone comma", "m{,} 1", 1, "expected label name or '}'"),
            (
                "double comma",
                "m{a=\"b\",,} 1",
                1,
                "expected label name or '}'",
            ),
            (
                "unclosed braces",
                "m{a=\"b\",",
                1,
                "expected label name or '}'",
            ),
            (
                "duplicate label",
                "m{a=\"1\",b=\"2\",a=\"3\"} 1",
                1,
                "duplicate label name \"a\"",
            ),
            (
                "junk after timestamp",
                "a 1\nb 2\nm 1 2 3",
                3,
                "unexpected text after timestamp",
            ),
            ("float timestamp", "m 1 1.5", 1, "invalid timestamp \"1.5\""),
            (
                "timestamp overflow",
                "m 1 99999999999999999999",
                1,
                "invalid timestamp",
            ),
            ("word value", "m abc", 1, "invalid value \"abc\""),
            ("signed NaN", "m -NaN", 1, "invalid value \"-NaN\""),
            ("hex value", "m 0x1p3", 1, "invalid value \"0x1p3\""),
            ("underscore value", "m 1_000", 1, "invalid value \"1_000\""),
            ("overflowing value", "m 1e400", 1, "out of range"),
            (
                "value glued to name",
                "m-1 2",
                1,
                "invalid character in metric name",
            ),
            ("name starts with digit", "1m 1", 1, "expected metric name"),
            ("no metric name", "{a=\"b\"} 1", 1, "missing metric name"),
            ("two metric names", "m{\"n\"} 1", 1, "given twice"),
            (
                "escape in quoted name",
                "{\"a\\\"b\"} 1",
                1,
                "escape sequences in quoted names",
            ),
            ("empty quoted name", "{\"\"} 1", 1, "empty quoted name"),
            (
                "bad TYPE",
                "# TYPE m countr",
                1,
                "invalid metric type \"countr\"",
            ),
            (
                "uppercase TYPE",
                "# TYPE m Counter",
                1,
                "invalid metric type",
            ),
            ("TYPE without type", "# TYPE m", 1, "missing metric type"),
            ("TYPE without name", "# TYPE", 1, "expected metric name"),
            (
                "TYPE bad name",
                "# TYPE 1m counter",
                1,
                "expected metric name",
            ),
            (
                "TYPE name with dash",
                "# TYPE m-x counter",
                1,
                "invalid metric name",
            ),
            ("HELP bad name", "# HELP m-x help", 1, "invalid metric name"),
            ("HELP without name", "# HELP  ", 1, "expected metric name"),
        ];
        for &(case, text, line, reason) in cases {
            let err = all(text).expect_err(case);
            assert_eq!(err.line, line, "{case}: line in {err}");
            assert!(
                err.reason.contains(reason),
                "{case}: reason {:?}",
                err.reason
            );
            let bad_line = text.lines().nth(line - 1).unwrap_or_default();
            assert_eq!(err.excerpt, bad_line, "{case}: excerpt");
        }
    }

    /// The whole reason, so a scrape's error says what was found where it failed.
    #[test]
    fn reasons_say_what_was_found() {
        let cases = [
            (
                "m{a=\"b\"  c",
                "expected ',' or '}' after label \"a\", found 'c'",
            ),
            (
                "m{a \"b\"} 1",
                "expected '=' after label name \"a\", found '\"'",
            ),
            (
                "m{a=b} 1",
                "expected '\"' to open the value of label \"a\", found 'b'",
            ),
            (
                "m{a=\"b\",",
                "expected label name or '}', found end of line",
            ),
            ("m{ä=\"b\"} 1", "expected label name or '}', found 'ä'"),
            ("m 1 2 x", "unexpected text after timestamp, found 'x'"),
            ("m-x 1", "invalid character in metric name, found '-'"),
            (
                "# HELP  ",
                "expected metric name, found end of line after HELP",
            ),
        ];
        for (text, reason) in cases {
            assert_eq!(all(text).expect_err(text).reason, reason, "{text}");
        }
    }

    #[test]
    fn error_display_and_excerpt_are_short() {
        let long = format!("m{{a=\"{}\"}} x", "ü".repeat(300));
        let err = all(&long).expect_err("long line");
        assert_eq!(err.excerpt.chars().count(), EXCERPT_CHARS);
        assert!(long.starts_with(&err.excerpt));
        let err = all("m{a=\"b\"} 1\r\nm x\r\n").expect_err("crlf");
        assert_eq!(err.to_string(), r#"line 2: invalid value "x": "m x""#);
    }

    #[test]
    fn comments_help_type_and_blank_lines_are_skipped() {
        let text = "# HELP m Some help, with \\\\ escapes \\n and \"quotes\"\n\
                    # TYPE m counter\n\
                    #TYPE g gauge\n\
                    # TYPE h histogram \n\
                    # TYPE s summary\n\
                    # TYPE u untyped\n\
                    # HELP e\n\
                    # HELP \"my.metric\" quoted\n\
                    # TYPE \"my.metric\" gauge\n\
                    # just a comment { \" = \\x\n\
                    #\n\
                    # HELPFUL is no keyword\n\
                    \n   \n\t\r\n\
                    m 1\n";
        let samples = all(text).expect("valid body");
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].name, "m");
    }

    #[test]
    fn bodies_without_samples_are_fine() {
        for (case, text) in [("empty", ""), ("newlines", "\n\n"), ("comment", "# x")] {
            let stats = parse(text, |_| true, |_| panic!("{case}: no samples")).expect(case);
            assert_eq!(stats, ParseStats::default(), "{case}");
        }
    }

    #[test]
    fn lines_are_numbered_across_crlf_and_blank_lines() {
        let err = all("# c\r\n\r\nm 1\r\n  \r\nm{a=\"b\",a=\"c\"} 1\r\n").expect_err("dup");
        assert_eq!(err.line, 5);
        assert_eq!(err.excerpt, "m{a=\"b\",a=\"c\"} 1");
    }

    #[test]
    fn only_wanted_samples_are_handed_over() {
        let text = "a{x=\"1\"} 1\nb{x=\"2\"} 2\na{x=\"3\"} 3\nc 4";
        let mut asked = Vec::new();
        let mut got = Vec::new();
        let stats = parse(
            text,
            |name| {
                asked.push(name.to_owned());
                name == "a"
            },
            |s| got.push((s.labels[0].1.to_string(), s.value)),
        )
        .expect("valid body");
        assert_eq!(
            asked,
            ["a", "b", "a", "c"],
            "want is asked once per sample line"
        );
        assert_eq!(got, [("1".to_owned(), 1.0), ("3".to_owned(), 3.0)]);
        assert_eq!(
            stats,
            ParseStats {
                samples: 4,
                wanted: 2,
                matched: 0
            }
        );
    }

    #[test]
    fn unwanted_lines_are_still_validated() {
        let cases = [
            ("bad escape", "a 1\nb{x=\"\\q\"} 2\n"),
            ("duplicate label", "a 1\nb{x=\"1\",x=\"2\"} 2\n"),
            ("bad value", "a 1\nb NaNa\n"),
            ("junk after timestamp", "a 1\nb 1 2 x\n"),
        ];
        for (case, text) in cases {
            let mut handed = 0;
            let err = parse(text, |name| name == "a", |_| handed += 1).expect_err(case);
            assert_eq!(err.line, 2, "{case}");
        }
    }

    #[test]
    fn values_without_escapes_are_borrowed() {
        let text = r#"m{plain="abc",escaped="a\"b",utf8="Süd"} 1"#;
        let samples = all(text).expect("valid line");
        let kinds: Vec<_> = samples[0]
            .labels
            .iter()
            .map(|(name, value)| (*name, matches!(value, Cow::Borrowed(_))))
            .collect();
        assert_eq!(kinds, [("plain", true), ("escaped", false), ("utf8", true)]);
    }

    #[test]
    fn many_labels_are_checked_for_duplicates() {
        let mut line = String::from("m{");
        for i in 0..40 {
            line.push_str(&format!("l{i}=\"{i}\","));
        }
        let text = format!("{line}}} 1");
        let sample = one("40 labels", &text);
        assert_eq!(sample.labels.len(), 40);
        let err = all(&format!("{line}l7=\"x\"}} 1")).expect_err("41st label repeats l7");
        assert_eq!(err.reason, "duplicate label name \"l7\"");
    }

    #[test]
    fn a_denbi_exporter_body_parses() {
        let text = "# HELP project_vcpu_usage Total vCPU hours used by the project\n\
                    # TYPE project_vcpu_usage counter\n\
                    project_vcpu_usage{domain_id=\"default\",domain_name=\"Default\",project_id=\"9a8b\",project_name=\"MyProject\"} 1234.5\n\
                    project_mb_usage{domain_id=\"default\",domain_name=\"Default\",project_id=\"9a8b\",project_name=\"MyProject\"} 2.5e6\n";
        let samples = all(text).expect("valid body");
        let project = [
            ("domain_id", "default"),
            ("domain_name", "Default"),
            ("project_id", "9a8b"),
            ("project_name", "MyProject"),
        ];
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].name, "project_vcpu_usage");
        assert_eq!(labels(&samples[0]), project);
        assert_eq!(samples[0].value, 1234.5);
        assert_eq!(samples[1].name, "project_mb_usage");
        assert_eq!(labels(&samples[1]), project);
        assert_eq!(samples[1].value, 2.5e6);
        assert!(samples.iter().all(|s| s.timestamp_ms.is_none()));
    }

    #[test]
    fn byte_search_finds_the_first_match_at_every_offset() {
        let hay = b"abcdefgh\"ijklmno\\pqrstuvwxyz\"";
        for from in 0..hay.len() {
            let expected = hay[from..]
                .iter()
                .position(|&b| b == b'"' || b == b'\\')
                .map(|i| from + i);
            assert_eq!(find_quote_or_backslash(hay, from), expected, "from {from}");
            let newline = hay[from..]
                .iter()
                .position(|&b| b == b'q')
                .map(|i| from + i);
            assert_eq!(find_byte(hay, from, b'q'), newline, "from {from}");
        }
        assert_eq!(find_byte(hay, hay.len() + 1, b'a'), None);
    }
}
