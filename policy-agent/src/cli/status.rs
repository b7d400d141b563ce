//! `status`.

use anyhow::Result;
use policy_api::client::Client;

use super::JsonArgs;

pub fn show(args: &JsonArgs, client: &Client) -> Result<()> {
    let Some(s) = args.get(client, "/v1/status")? else { return Ok(()) };
    println!("pins:      {}", s["pin_dir"].as_str().unwrap_or("?"));
    let attached: Vec<&str> =
        s["attached"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
    println!(
        "attached:  {} links{}",
        attached.len(),
        if attached.is_empty() { String::new() } else { format!(" ({})", attached.join(", ")) }
    );
    println!("endpoints: {}", s["endpoints"]);
    println!("policies:  {}", s["policies"]);
    println!("epoch:     {}", s["epoch"]);
    match s["overlay"].as_object() {
        Some(o) => println!(
            "overlay:   {} ({} endpoint slots)",
            o["network"].as_str().unwrap_or("?"),
            o["slots"]
        ),
        None => println!("overlay:   none (every endpoint lookup hashed)"),
    }
    println!("apps:");
    for app in s["apps"].as_array().into_iter().flatten() {
        println!("  {} {}", app["tag"].as_str().unwrap_or("?"), app["id"].as_str().unwrap_or("?"));
    }
    println!("maps:                entries / capacity    kernel memory");
    for m in s["maps"].as_array().into_iter().flatten() {
        println!(
            "  {:<14} {:>9} / {:<10} {:>9.1} MiB",
            m["name"].as_str().unwrap_or("?"),
            m["entries"],
            m["capacity"],
            m["bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20)
        );
    }
    println!("verdicts:");
    for v in s["verdicts"].as_array().into_iter().flatten() {
        println!(
            "  {} {:<17} {}",
            v["verdict"].as_str().unwrap_or("?"),
            v["reason"].as_str().unwrap_or("?"),
            v["packets"]
        );
    }
    Ok(())
}
