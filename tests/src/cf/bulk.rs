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

    /// Gives `sources` new apps `{prefix}0`, `{prefix}1`, ... each a policy
    /// to the app `to` on each TCP port of `ports`; then moves
    /// `policies_last_updated`. `sources` × `ports` policies in one
    /// transaction. The new apps take the first blank `groups` rows, as
    /// the server's store gives a new app one (`store/group.go`), so the
    /// apps it knows keep their rows and tags: `to` among them (it must
    /// have a policy already), unlike [`PolicyServer::put_policies_in_bulk`],
    /// which renames rows 1 to `apps`. `to`'s destinations on those ports
    /// are shared with the policies there already, as the store shares
    /// them. Panics if `to` has no row, or a name exists already.
    pub fn put_policies_to_app_in_bulk(&self, prefix: &str, sources: u32, to: &str, ports: &[u16]) {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let ports = ports.join(", ");
        let sql = format!(
            "BEGIN;
             -- A division by zero, which ends the script, unless `to` has a row.
             SELECT 1 / COUNT(*) FROM groups WHERE guid = :'to';
             CREATE TEMP TABLE bulk_sources ON COMMIT DROP AS
                 SELECT id, row_number() OVER (ORDER BY id) - 1 AS n
                 FROM groups WHERE guid IS NULL ORDER BY id LIMIT {sources};
             UPDATE groups SET guid = :'prefix' || s.n, type = 'app'
                 FROM bulk_sources s WHERE groups.id = s.id;
             INSERT INTO destinations (group_id, port, start_port, end_port, protocol)
                 SELECT g.id, p, p, p, 'tcp' FROM groups g, unnest(ARRAY[{ports}]::int[]) p
                 WHERE g.guid = :'to'
                 ON CONFLICT DO NOTHING;
             INSERT INTO policies (group_id, destination_id)
                 SELECT s.id, d.id FROM bulk_sources s, destinations d
                 JOIN groups g ON g.id = d.group_id
                 WHERE g.guid = :'to' AND d.protocol = 'tcp'
                     AND d.start_port = d.end_port AND d.start_port IN ({ports});
             UPDATE policies_info SET last_updated = CURRENT_TIMESTAMP(6);
             COMMIT;"
        );
        self.sql(&sql, &[("prefix", prefix), ("to", to)]);
    }

    /// Deletes every policy to the app `to`, whatever its source, protocol
    /// and ports, and their destinations; then moves
    /// `policies_last_updated`. Every app keeps its `groups` row (and so
    /// its tag), where the external API blanks the row of an app left
    /// without policies.
    pub fn delete_policies_to_app(&self, to: &str) {
        let sql = "BEGIN;
             DELETE FROM policies WHERE destination_id IN (
                 SELECT d.id FROM destinations d JOIN groups g ON g.id = d.group_id
                 WHERE g.guid = :'to');
             DELETE FROM destinations WHERE group_id IN (SELECT id FROM groups WHERE guid = :'to');
             UPDATE policies_info SET last_updated = CURRENT_TIMESTAMP(6);
             COMMIT;";
        self.sql(sql, &[("to", to)]);
    }
}
