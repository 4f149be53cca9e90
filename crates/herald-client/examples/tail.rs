//! Prints every message of the channels named on the command line, resuming across
//! reconnects: `cargo run -p herald-client --example tail -- ws://127.0.0.1:8080/ws news`.

use herald_client::{Client, Config, Event};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:8080/ws".into());
    let client = Client::start(Config::new(url));
    let mut tasks = Vec::new();
    for channel in args {
        let mut sub = match client.subscribe(&channel) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{channel}: {e}");
                continue;
            }
        };
        tasks.push(tokio::spawn(async move {
            while let Some(event) = sub.next().await {
                match event {
                    Event::Message { data, offset } => {
                        let offset = offset.map_or(String::new(), |o| format!("#{o} "));
                        println!(
                            "{} {offset}{}",
                            sub.channel(),
                            String::from_utf8_lossy(&data)
                        );
                    }
                    Event::Recovered(false) => {
                        eprintln!("{}: missed messages are gone", sub.channel())
                    }
                    Event::Refused(why) => eprintln!("{}: refused: {why}", sub.channel()),
                    _ => {}
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}
