//! Security groups in the policy server's database. The server learns
//! them only from Cloud Controller (its ASG syncer replaces the table),
//! which the tests keep unreachable, so they are written into the table
//! as that syncer writes them (policy-server `store/security_groups_store.go`
//! `Replace`; the table: migration v0067, `id` a bigint since v0075).
//! The internal API reads the table on every request: nothing else
//! (no last-updated row) needs to move.

use super::PolicyServer;

/// The syncer's upsert, keyed by `guid`. The space lists are JSON arrays
/// (`jsonb`); `rules` is the JSON text Cloud Controller stored.
const UPSERT: &str = "
INSERT INTO security_groups
    (guid, name, rules, staging_default, running_default, staging_spaces, running_spaces)
VALUES (:'guid', :'name', :'rules', :'staging_default'::bool, :'running_default'::bool,
        :'staging_spaces'::jsonb, :'running_spaces'::jsonb)
ON CONFLICT (guid) DO UPDATE SET
    name = EXCLUDED.name, rules = EXCLUDED.rules,
    staging_default = EXCLUDED.staging_default, running_default = EXCLUDED.running_default,
    staging_spaces = EXCLUDED.staging_spaces, running_spaces = EXCLUDED.running_spaces;
";

impl PolicyServer {
    /// Writes (or rewrites) the security group `guid` (at most 36
    /// characters, the column's size), as Cloud Controller's sync would:
    /// `rules_json` is the group's rules as CF stores them (a JSON array:
    /// `[{"protocol":"tcp","destination":"10.0.0.0/8","ports":"443"}]`).
    /// Panics if the database refuses it.
    #[expect(clippy::too_many_arguments, reason = "one per column of the table")]
    pub fn put_security_group(
        &self,
        guid: &str,
        name: &str,
        rules_json: &str,
        running_default: bool,
        staging_default: bool,
        running_spaces: &[&str],
        staging_spaces: &[&str],
    ) {
        let spaces = |list: &[&str]| serde_json::Value::from(list.to_vec()).to_string();
        let (running, staging) = (spaces(running_spaces), spaces(staging_spaces));
        let vars = [
            ("guid", guid),
            ("name", name),
            ("rules", rules_json),
            ("running_default", if running_default { "true" } else { "false" }),
            ("staging_default", if staging_default { "true" } else { "false" }),
            ("running_spaces", running.as_str()),
            ("staging_spaces", staging.as_str()),
        ];
        self.sql(UPSERT, &vars);
    }

    /// The groups the egress tests start from: `default-1`, the running
    /// default, allows TCP 443 to 192.0.2.0/24; `space-1-group` allows TCP
    /// `space_ports` to 192.0.2.10 for the running containers of
    /// `spaces`. Called again, it rewrites the space's group.
    pub fn put_default_and_space_groups(&self, space_ports: &str, spaces: &[&str]) {
        self.put_security_group(
            "default-1",
            "public",
            r#"[{"protocol":"tcp","destination":"192.0.2.0/24","ports":"443"}]"#,
            true,
            false,
            &[],
            &[],
        );
        self.put_space_group(space_ports, spaces);
    }

    /// Rewrites `space-1-group` (see [`Self::put_default_and_space_groups`]).
    pub fn put_space_group(&self, ports: &str, spaces: &[&str]) {
        let rules =
            format!(r#"[{{"protocol":"tcp","destination":"192.0.2.10","ports":"{ports}"}}]"#);
        self.put_security_group("space-1-group", "s1", &rules, false, false, spaces, &[]);
    }

    /// Deletes the security group `guid` (nothing if there is none).
    pub fn delete_security_group(&self, guid: &str) {
        self.sql("DELETE FROM security_groups WHERE guid = :'guid';", &[("guid", guid)]);
    }

    pub(super) fn sql(&self, sql: &str, vars: &[(&str, &str)]) {
        let postgres = self.postgres.as_ref().expect("postgres runs while the server does");
        if let Err(e) = postgres.psql(&self.network, sql, vars) {
            panic!("{sql}\nwith {vars:?}: {e}\n{}", self.logs());
        }
    }
}
