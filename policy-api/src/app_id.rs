//! Which app ids are valid: the agent checks every id it is given with
//! this, and the CNI plugin checks the id it will register before it
//! makes anything.

/// Longest app id accepted (CF's are UUIDs, 36 characters).
pub const MAX_ID_LEN: usize = 255;

/// Why an app id is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AppIdError {
    #[error("must not be empty")]
    Empty,
    #[error("longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("must not contain whitespace, control characters or commas")]
    Separator,
    #[error("must not contain invisible or text-direction characters (U+{:04X})", u32::from(*.0))]
    Invisible(char),
}

/// Checks an app id: non-empty, at most [`MAX_ID_LEN`] bytes, printable, no
/// whitespace, no commas (ids are comma-separated in API filters), nothing
/// invisible (an id holding one looks like another id).
pub fn check_app_id(id: &str) -> Result<(), AppIdError> {
    if id.is_empty() {
        return Err(AppIdError::Empty);
    }
    if id.len() > MAX_ID_LEN {
        return Err(AppIdError::TooLong);
    }
    if id.chars().any(|c| c.is_control() || c.is_whitespace() || c == ',') {
        return Err(AppIdError::Separator);
    }
    if let Some(c) = id.chars().find(|c| is_invisible(*c)) {
        return Err(AppIdError::Invisible(c));
    }
    Ok(())
}

/// Format characters (Unicode category Cf: zero-width spaces and joiners,
/// bidirectional embeddings, overrides and isolates, the BOM, soft hyphen,
/// tag characters) and other characters that render as nothing: an id
/// holding one looks like another id.
fn is_invisible(c: char) -> bool {
    matches!(
        u32::from(c),
        0x00AD
            | 0x034F
            | 0x061C
            | 0x115F..=0x1160
            | 0x17B4..=0x17B5
            | 0x180B..=0x180F
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x206F
            | 0x3164
            | 0xFE00..=0xFE0F
            | 0xFEFF
            | 0xFFA0
            | 0xFFF0..=0xFFFB
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0000..=0xE0FFF
    )
}
