//! Many policies at once, written straight into the policy server's
//! tables as its own store writes them (the README of the fixture names
//! the steps): the external API takes a few hundred per request and
//! checks each against Cloud Controller's limits, which a scale test of
//! 60,000 policies would spend minutes on.

use super::PolicyServer;

impl PolicyServer {
    /// Names `apps` apps `{prefix}0`, `{prefix}1`, ... (tags 1, 2, ...,
    /// their `groups` rows) and gives each of them a policy to app
    /// `{prefix}{to}` on each TCP port of `ports`; then moves
    /// `policies_last_updated`. `apps` × `ports` policies in one
    /// transaction.
    pub fn put_policies_in_bulk(&self, prefix: &str, apps: u32, to: u32, ports: &[u16]) {
        let destinations: Vec<String> =
            ports.iter().map(|p| format!("({}, {p}, {p}, {p}, 'tcp')", to + 1)).collect();
        let sql = format!(
            "BEGIN;
             UPDATE groups SET guid = :'prefix' || (id - 1), type = 'app' WHERE id <= {apps};
             INSERT INTO destinations (group_id, port, start_port, end_port, protocol) VALUES {};
             INSERT INTO policies (group_id, destination_id)
                 SELECT g.id, d.id FROM groups g, destinations d
                 WHERE g.id <= {apps} AND d.group_id = {};
             UPDATE policies_info SET last_updated = CURRENT_TIMESTAMP(6);
             COMMIT;",
            destinations.join(", "),
            to + 1
        );
        self.sql(&sql, &[("prefix", prefix)]);
    }
}
