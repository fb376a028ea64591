//! Per-key order as the members wrote it down (the crash run with key lanes).

use std::collections::HashMap;

use super::harness::Handled;

/// Where a member handled a key's record after a later record of the same
/// key, in the order it wrote them down, and the record was handled only
/// that once in the run: not a record read again after a kill or a
/// rebalance (those restart from the commit and are handled twice), so a
/// break of the key's order.
pub fn key_order_broken(handled: &Handled) -> Vec<String> {
    let counts = handled.counts();
    let mut broken = Vec::new();
    for (member, records) in &handled.by_member {
        let mut highest: HashMap<(i32, &str), i64> = HashMap::new();
        for (partition, offset, id) in records {
            let Some(key) = handled.key_of.get(&(*partition, *offset)) else {
                continue;
            };
            let top = highest.entry((*partition, key.as_str())).or_insert(-1);
            if *offset < *top && counts.get(id.as_str()) == Some(&1) {
                broken.push(format!(
                    "{member}: key {key} partition {partition}: offset {offset} after {top}"
                ));
            }
            *top = (*top).max(*offset);
        }
    }
    broken
}
