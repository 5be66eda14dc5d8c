//! Error formatting shared by every layer.

/// `e` and every cause under it on one line, without repeats (library errors often wrap
/// a cause and repeat its text).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        // tonic's transport errors say only this and keep what happened in their source.
        let opaque = text == "transport error" && err.source().is_some();
        if !opaque && !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_skips_repeats() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = std::io::Error::other(inner);
        // io::Error::other displays its inner error: the repeat is dropped.
        assert_eq!(error_chain(&outer), "refused");
    }
}
