//! Known scanners by User-Agent: one Aho-Corasick automaton over the whole list, matched
//! case-insensitively, so a list of thousands costs the same per packet as a list of five.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

pub struct ScannerMatcher {
    ac: Option<AhoCorasick>,
    patterns: Vec<String>,
}

impl ScannerMatcher {
    pub fn new(patterns: &[String]) -> Self {
        let patterns: Vec<String> = patterns
            .iter()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        let ac = AhoCorasickBuilder::new()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::LeftmostFirst)
            .build(&patterns)
            .ok();
        Self { ac, patterns }
    }

    /// The first listed pattern found in `user_agent`.
    pub fn find(&self, user_agent: &[u8]) -> Option<&str> {
        if user_agent.is_empty() {
            return None;
        }
        let m = self.ac.as_ref()?.find(user_agent)?;
        self.patterns
            .get(m.pattern().as_usize())
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_case_insensitively_anywhere() {
        let m = ScannerMatcher::new(&[
            "friendly-scanner".into(),
            "sipvicious".into(),
            "smap".into(),
        ]);
        assert_eq!(m.find(b"Friendly-Scanner"), Some("friendly-scanner"));
        assert_eq!(m.find(b"x SIPVicious/0.3.3"), Some("sipvicious"));
        assert_eq!(m.find(b"Yealink SIP-T46S 66.86.0.15"), None);
        assert_eq!(m.find(b""), None);
    }

    #[test]
    fn thousands_of_patterns_build() {
        let many: Vec<String> = (0..5000).map(|i| format!("tool-{i}-x")).collect();
        let m = ScannerMatcher::new(&many);
        assert_eq!(m.find(b"ua TOOL-4999-X/1.0"), Some("tool-4999-x"));
        assert_eq!(m.find(b"Grandstream GXP2170"), None);
    }
}
