//! Questions to the operator: prompts go to stderr so stdout stays clean for `-o json`;
//! answers come from stdin lines, the password from the terminal without echo.

use std::io::{BufRead as _, Write as _};

use secrecy::SecretString;

use crate::error::{Error, Result};

/// A second factor, as `VerifyMfa` takes it.
#[derive(Debug)]
pub enum Factor {
    /// A 6-digit TOTP code.
    Totp(SecretString),
    /// A single-use recovery code.
    Recovery(SecretString),
}

/// Prints `question` on stderr and reads one line of stdin, without its line ending.
/// `None` at end of input.
pub fn line(question: &str) -> Result<Option<String>> {
    if !question.is_empty() {
        eprint!("{question}");
        let _ = std::io::stderr().flush();
    }
    let answer = read_stdin_line()?;
    if answer.is_none() && !question.is_empty() {
        // End of input leaves the cursor after the question; errors start on a new line.
        eprintln!();
    }
    Ok(answer)
}

fn read_stdin_line() -> Result<Option<String>> {
    let mut buf = String::new();
    let n = std::io::stdin()
        .lock()
        .read_line(&mut buf)
        .map_err(Error::io("reading stdin"))?;
    if n == 0 {
        return Ok(None);
    }
    let trimmed = buf.trim_end_matches(['\r', '\n']).to_owned();
    zeroize::Zeroize::zeroize(&mut buf);
    Ok(Some(trimmed))
}

/// The password: the first line of stdin with `--password-stdin`, else asked on the
/// terminal without echo.
pub fn password(from_stdin: bool) -> Result<SecretString> {
    let text = if from_stdin {
        read_stdin_line()?.ok_or_else(|| {
            Error::Usage("--password-stdin: stdin is empty; expected the password".into())
        })?
    } else {
        rpassword::prompt_password("Password: ").map_err(|e| Error::Io {
            what: "reading the password from the terminal (use --password-stdin in scripts)".into(),
            source: e,
        })?
    };
    if text.is_empty() {
        return Err(Error::Usage("the password is empty".into()));
    }
    Ok(SecretString::from(text))
}

/// The second factor: `--totp-code` or `--recovery-code` when given, else asked for on stdin
/// (six digits are a TOTP code, anything else a recovery code).
pub fn factor(
    totp_flag: Option<&SecretString>,
    recovery_flag: Option<&SecretString>,
    why: &str,
) -> Result<Factor> {
    if let Some(code) = totp_flag {
        return Ok(Factor::Totp(code.clone()));
    }
    if let Some(code) = recovery_flag {
        return Ok(Factor::Recovery(code.clone()));
    }
    eprintln!("{why}");
    let answer = line("TOTP code (or a recovery code): ")?.unwrap_or_default();
    classify(answer.trim())
}

/// Tells a TOTP code from a recovery code.
fn classify(answer: &str) -> Result<Factor> {
    if answer.is_empty() {
        return Err(Error::Usage(
            "a second factor is required: pass --totp-code or --recovery-code".into(),
        ));
    }
    let digits: String = answer.chars().filter(|c| !c.is_whitespace()).collect();
    if digits.len() == 6 && digits.chars().all(|c| c.is_ascii_digit()) {
        Ok(Factor::Totp(SecretString::from(digits)))
    } else {
        Ok(Factor::Recovery(SecretString::from(answer)))
    }
}

/// Asks a yes/no question; only `y` or `yes` is a yes, end of input is a no.
pub fn confirm(question: &str) -> Result<bool> {
    let answer = line(&format!("{question} [y/N] "))?.unwrap_or_default();
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;

    #[test]
    fn six_digits_are_a_totp_code() {
        match classify("123 456").unwrap() {
            Factor::Totp(c) => assert_eq!(c.expose_secret(), "123456"),
            Factor::Recovery(_) => panic!("expected a TOTP code"),
        }
        assert!(matches!(
            classify("abcd-efgh-ijkl").unwrap(),
            Factor::Recovery(_)
        ));
        assert!(classify("").is_err());
    }

    #[test]
    fn flags_win_over_prompts() {
        let code = SecretString::from("654321");
        match factor(Some(&code), None, "").unwrap() {
            Factor::Totp(c) => assert_eq!(c.expose_secret(), "654321"),
            Factor::Recovery(_) => panic!("expected a TOTP code"),
        }
    }
}
