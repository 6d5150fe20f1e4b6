//! The ground everything stands on: real servers start, change streams deliver events.

mod common;

use common::Pair;
use futures::StreamExt;
use mongodb::bson::{doc, Document};
use std::time::Duration;

#[tokio::test]
async fn insert_in_production_is_seen_by_a_change_stream() {
    let pair = Pair::start();
    let coll = pair.prod().await.collection::<Document>("events");
    let mut stream = coll
        .watch()
        .await
        .expect("production supports change streams");
    coll.insert_one(doc! { "userEmail": "ann@example.org", "n": 1 })
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("an event within 20 s")
        .expect("stream open")
        .expect("event decodes");
    let full = event.full_document.expect("inserts carry the document");
    assert_eq!(full.get_str("userEmail").unwrap(), "ann@example.org");
    assert_eq!(full.get_i32("n").unwrap(), 1);
    assert!(
        event.cluster_time.is_some(),
        "events carry their cluster time"
    );
}
