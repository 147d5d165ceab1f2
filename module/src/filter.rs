//! The command filter: the first step of the write path. Redis calls it for
//! every command before looking the command up; it gathers what routing
//! needs, asks `routing::route` (pure, and where every rule is explained),
//! applies the bookkeeping the route asks for, and puts the chosen wrapper
//! in front of the command (`SET k v` becomes `KEEL.W SET k v`). The
//! module's own `RM_Call`s skip it (`redis::Ctx::call`).

use crate::acl;
use crate::redis::Filtered;
use crate::redis::in_module_call;
use crate::redis::keys_of;
use crate::routing;
use crate::routing::AclEffect;
use crate::routing::Route;
use crate::state::state;

pub fn filter(f: &mut Filtered) {
    let argc = f.len();
    let client = routing::Client { id: f.client_id(), in_module_call: in_module_call() };
    let routing = {
        let argv = f.args();
        let args: Vec<&[u8]> = argv.iter().map(|a| a.bytes()).collect();
        let mut st = state();
        let routing = {
            let st = &*st;
            let world = routing::World {
                table: &st.table,
                gate: &st.gate,
                now_ms: crate::redis::monotonic_ms(),
                txs: &st.txs,
                hazards: &st.hazards,
                control_user: st.cfg.control_user.as_bytes(),
            };
            routing::route(&args, client, &world, || keys_of(&argv))
        };
        if routing.acl == AclEffect::UsersReloaded {
            st.acl_grant_pending = true;
        }
        if routing.ends_transaction {
            // RESET ends the client's MULTI and WATCHes.
            if let Some(id) = client.id {
                st.txs.disconnected(id);
            }
        }
        if let Route::Transaction { exec, .. } = routing.route {
            st.txs.routed(client.sender(), exec);
        }
        routing
    };
    if routing.acl == AclEffect::AppendGrants {
        // The user keeps the wrappers whatever the rules say (acl.rs).
        for (i, rule) in acl::grant_rules().enumerate() {
            f.insert(argc + i, rule.as_bytes());
        }
    }
    if let Some(prefix) = routing.route.prefix() {
        f.insert(0, prefix.as_bytes());
    }
}
