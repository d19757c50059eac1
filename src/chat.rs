//! `lmms-ft chat`: a multi-turn conversation with a model in the terminal, the step every
//! fine-tuning guide ends with. Each turn re-renders the whole conversation with the model's
//! own template (what training saw) and streams the reply as it is generated.
//!
//! Input is read line by line, so the same loop serves a terminal and a pipe (which is how
//! the tests drive it). A line is a user turn, except:
//!
//! - `/image PATH` attaches an image to the next user turn (repeatable);
//! - `/video PATH` attaches a video to the next user turn;
//! - `/reset` starts a new conversation (keeping the system prompt);
//! - `/exit` (or end of input) ends the session.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use anyhow::{Context, Result};
use lmms_ft_core::config::Config;
use lmms_ft_core::data::media::load_image;
use lmms_ft_core::data::prepare::MediaOptions;
use lmms_ft_core::data::video::load_video;
use lmms_ft_core::data::{Conversation, DecodedMedia, Part, Role, Turn};
use lmms_ft_core::family::{Pipeline, PreparedConversation};
use lmms_ft_core::generate::GenerateOptions;

use crate::cli::ChatArgs;
use crate::commands::open_for_inference;

/// The conversation so far and the media waiting for the next user turn.
struct Session {
    system: Option<String>,
    conversation: Conversation,
    media: DecodedMedia,
    pending: Vec<Part>,
    media_opts: MediaOptions,
}

impl Session {
    fn new(system: Option<String>, media_opts: MediaOptions) -> Self {
        let mut session = Session {
            system,
            conversation: Conversation::default(),
            media: DecodedMedia::default(),
            pending: Vec::new(),
            media_opts,
        };
        session.reset();
        session
    }

    fn reset(&mut self) {
        self.conversation.turns.clear();
        if let Some(system) = &self.system {
            self.conversation
                .turns
                .push(Turn::text(Role::System, system.clone()));
        }
        self.media = DecodedMedia::default();
        self.pending.clear();
    }

    fn add_image(&mut self, path: &Path) -> Result<()> {
        let image = load_image(path, &self.media_opts.image_limits)?;
        self.pending.push(Part::Image {
            index: self.media.images.len(),
        });
        self.media.images.push(image);
        Ok(())
    }

    fn add_video(&mut self, path: &Path) -> Result<()> {
        let clip = load_video(path, &self.media_opts.video)?;
        self.pending.push(Part::Video {
            index: self.media.videos.len(),
        });
        self.media.videos.push(clip);
        Ok(())
    }

    /// The conversation with `text` as a new user turn (media first, as the dataset
    /// convention puts it).
    fn with_user_turn(&mut self, text: &str) -> PreparedConversation {
        let mut parts = std::mem::take(&mut self.pending);
        parts.push(Part::Text {
            text: text.to_string(),
        });
        self.conversation.turns.push(Turn {
            role: Role::User,
            parts,
        });
        PreparedConversation {
            conversation: self.conversation.clone(),
            media: self.media.clone(),
        }
    }
}

pub fn run(cfg: &Config, req: &ChatArgs) -> Result<()> {
    let pipeline = open_for_inference(cfg, req.adapter.as_deref())?;
    let mut session = Session::new(req.system.clone(), MediaOptions::from_config(&cfg.data));
    for path in &req.image {
        session.add_image(path)?;
    }
    let options = req.generation.options();
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        eprintln!("chat: type a message; /image PATH, /video PATH, /reset, /exit");
    }
    let mut lines = stdin.lock().lines();
    let mut turn = 0usize;
    loop {
        if interactive {
            eprint!("user> ");
            std::io::stderr().flush().ok();
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading standard input")?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(command) = line.strip_prefix('/') {
            let (name, arg) = command.split_once(' ').unwrap_or((command, ""));
            let arg = arg.trim();
            let done = match name {
                "exit" | "quit" => break,
                "reset" => {
                    session.reset();
                    Ok(())
                }
                "image" if !arg.is_empty() => session.add_image(Path::new(arg)),
                "video" if !arg.is_empty() => session.add_video(Path::new(arg)),
                _ => Err(anyhow::anyhow!(
                    "unknown command `{line}`; use /image PATH, /video PATH, /reset or /exit"
                )),
            };
            match done {
                Ok(()) if interactive => eprintln!("ok"),
                Ok(()) => {}
                // A typo must not end the conversation; a pipe gets the error too.
                Err(e) => eprintln!("error: {e:#}"),
            }
            continue;
        }
        let prepared = session.with_user_turn(line);
        let reply = reply(pipeline.as_ref(), &prepared, &options, req.json.json)?;
        if req.json.json {
            let row = serde_json::json!({
                "turn": turn,
                "text": reply.text,
                "token_ids": reply.token_ids,
                "stopped": reply.stopped,
            });
            println!("{row}");
        }
        session
            .conversation
            .turns
            .push(Turn::text(Role::Assistant, reply.text));
        turn += 1;
    }
    Ok(())
}

/// Generates one reply, streaming its text to stdout unless `quiet`.
fn reply(
    pipeline: &dyn Pipeline,
    prepared: &PreparedConversation,
    opts: &GenerateOptions,
    quiet: bool,
) -> Result<lmms_ft_core::generate::Generated> {
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    let mut replies =
        pipeline.generate_batch(std::slice::from_ref(prepared), opts, &mut |_, piece| {
            if !quiet {
                if let Err(e) = out.write_all(piece.as_bytes()).and_then(|()| out.flush()) {
                    write_err = Some(e);
                }
            }
        })?;
    if let Some(e) = write_err {
        return Err(e).context("writing the reply");
    }
    if !quiet {
        writeln!(out).context("writing the reply")?;
    }
    replies.pop().context("generation returned no reply")
}
