//! `outpost logs OPERATION [--follow] [--stderr]`: a running (or recently
//! finished) action's output. Without `--follow`, what there is now, from
//! the coordinator's `/live/...` view; with it, a ByteStream Read of the
//! operation's stream name, printed as it comes until the action ends.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use outpost_proto::bytestream::{ReadRequest, byte_stream_client::ByteStreamClient};
use outpost_proto::client::error_chain;

use crate::admin::Target;

#[derive(Args, Clone, Debug)]
pub struct LogsArgs {
    /// The operation, as Execute named it (`operations/ID`, or just ID).
    pub operation: String,
    /// Keep printing what the action writes until it ends.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Print its stderr rather than its stdout.
    #[arg(long)]
    pub stderr: bool,
    #[command(flatten)]
    pub target: Target,
}

pub async fn run(args: LogsArgs) -> anyhow::Result<()> {
    let operation = if args.operation.contains('/') {
        args.operation.clone()
    } else {
        format!("operations/{}", args.operation)
    };
    let stream = if args.stderr { "stderr" } else { "stdout" };
    if !args.follow {
        let body =
            crate::admin::request(&args.target, "GET", &format!("/live/{operation}/{stream}"))
                .await?;
        print!("{body}");
        return Ok(());
    }
    let target = &args.target;
    let dial = target.credentials.dial(&target.coordinator);
    let channel = dial
        .endpoint()?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the coordinator at {}: {}",
                target.coordinator,
                error_chain(&e)
            )
        })?;
    let mut client = ByteStreamClient::new(outpost_proto::client::Transport::new(
        channel,
        dial.bearer()?,
    ));
    let mut reply = client
        .read(ReadRequest {
            resource_name: format!("{operation}/streams/{stream}"),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{} ({:?})", s.message(), s.code()))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = reply
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{} ({:?})", s.message(), s.code()))?
    {
        out.write_all(&chunk.data)
            .and_then(|()| out.flush())
            .context("writing to stdout")?;
    }
    Ok(())
}
