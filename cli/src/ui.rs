//! Terminal manners: colour only on a terminal and never with `NO_COLOR`, hidden secret
//! input, yes/no questions, opening a browser.

use std::io::{IsTerminal, Write};
use std::process::{Command, Stdio};

/// Whether to colour output on a stream: only a terminal, and `NO_COLOR` (any value but
/// empty) turns it off, per no-color.org.
pub fn colour_wanted(is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Colour for stdout.
pub fn stdout_colour() -> bool {
    colour_wanted(
        std::io::stdout().is_terminal(),
        std::env::var_os("NO_COLOR"),
    )
}

/// Paints `text` with an SGR code when `on`.
pub fn paint(on: bool, sgr: &str, text: &str) -> String {
    if on {
        format!("\x1b[{sgr}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

/// Whether a person is at the keyboard (stdin and stderr are terminals).
pub fn interactive() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// Asks a yes/no question on stderr; `default` answers an empty line.
pub fn confirm(question: &str, default: bool) -> bool {
    eprint!("{question} [{}] ", if default { "Y/n" } else { "y/N" });
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).is_err() {
        return false;
    }
    match line.trim().to_ascii_lowercase().as_str() {
        "" => default,
        a => a == "y" || a == "yes",
    }
}

/// Reads a secret from the terminal without echo.
pub fn read_hidden(prompt: &str) -> std::io::Result<String> {
    rpassword::prompt_password(prompt)
}

/// The browser command: `$BROWSER` (first of a `:` list), else `xdg-open` when a display
/// exists and it is installed.
pub fn browser() -> Option<String> {
    if let Some(b) = std::env::var("BROWSER")
        .ok()
        .and_then(|b| b.split(':').next().map(str::to_owned))
        .filter(|b| !b.trim().is_empty())
    {
        return Some(b);
    }
    let display = ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
    (display && on_path("xdg-open")).then(|| "xdg-open".to_owned())
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

/// Starts the browser on `url` without waiting for it.
pub fn open_browser(cmd: &str, url: &str) -> Result<(), String> {
    // `$BROWSER` may carry arguments ("firefox --new-window").
    let mut parts = cmd.split_whitespace();
    let program = parts.next().ok_or("empty browser command")?;
    Command::new(program)
        .args(parts)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(drop)
        .map_err(|e| format!("cannot start `{program}`: {e}"))
}

/// Offers to open `url`: `Some(true)` opens without asking, `Some(false)` never opens, and
/// `None` asks when someone is at a terminal and a browser is available.
pub fn offer_browser(url: &str, choice: Option<bool>) {
    let Some(cmd) = browser() else {
        if choice == Some(true) {
            eprintln!("llmctl: no browser found (set $BROWSER); open the URL by hand");
        }
        return;
    };
    let open = match choice {
        Some(c) => c,
        None => interactive() && confirm("Open it in your browser?", true),
    };
    if open {
        if let Err(e) = open_browser(&cmd, url) {
            eprintln!("llmctl: {e}; open the URL by hand");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_rules() {
        assert!(colour_wanted(true, None));
        assert!(!colour_wanted(false, None));
        assert!(!colour_wanted(true, Some("1".into())));
        assert!(colour_wanted(true, Some("".into())));
    }
}
