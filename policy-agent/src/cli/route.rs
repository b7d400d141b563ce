//! `map-route`, `unmap-route`, `routes`: internal routes, with the `cf` verbs.

use anyhow::Result;
use clap::Args;
use policy_agent::api::wire;
use policy_api::{client::Client, wire as shapes};

use super::{JsonArgs, call};

#[derive(Args)]
pub struct RouteArgs {
    app: String,
    /// Only apps.internal.
    domain: String,
    /// The route's host: HOST.apps.internal.
    #[arg(long)]
    hostname: String,
}

impl RouteArgs {
    fn body(&self) -> serde_json::Value {
        wire::to_json(&shapes::Route {
            app: self.app.clone(),
            domain: Some(self.domain.clone()),
            hostname: self.hostname.clone(),
        })
    }

    pub fn map(self, client: &Client) -> Result<()> {
        call(client, "POST", "/v1/routes", Some(&self.body()))?;
        println!("Mapped route {}.{} to app {}: OK", self.hostname, self.domain, self.app);
        Ok(())
    }

    pub fn unmap(self, client: &Client) -> Result<()> {
        call(client, "POST", "/v1/routes/delete", Some(&self.body()))?;
        println!("Unmapped route {}.{} from app {}: OK", self.hostname, self.domain, self.app);
        Ok(())
    }
}

pub fn list(args: &JsonArgs, client: &Client) -> Result<()> {
    let Some(body) = args.get(client, "/v1/routes")? else { return Ok(()) };
    let list: shapes::Routes = serde_json::from_value(body)?;
    println!("{:<40} app", "route");
    for r in list.routes {
        let route = format!("{}.{}", r.hostname, r.domain());
        println!("{route:<40} {}", r.app);
    }
    Ok(())
}
