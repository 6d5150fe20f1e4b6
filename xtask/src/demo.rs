//! `cargo xtask demo`: the README's first command, end to end on local servers.
//!
//! Starts a production and a staging server, seeds both (staging already holds some of the same
//! customers under its own `_id`s, with QA notes), runs `stagesync run` as a child process, makes
//! live production changes and prints staging after each, then stops everything. Orders
//! reference customers (`customerId`); one customer is adopted under a staging `_id`, and the
//! demo ends with a `$lookup` from orders to customers in staging that finds every customer.

use std::future::Future;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};
use mongodb::{Client, Collection};

use stagesync_testkit::{server_binary, LocalServer};

const CONFIG: &str = r#"
[source]
uri = "${PROD_URI}"
database = "shop"
[target]
uri = "${STAGING_URI}"
database = "shop_staging"
[sync]
name = "demo"
write_concern = 1
checkpoint_interval = "500ms"
[[collections]]
name = "orders"
business_key = ["userEmail", "accountId"]
preserve = ["qaNote", "experiments.*"]
deletes = "soft"
[collections.references]
customerId = "customers"       # rewritten to the customer's staging _id

[[collections]]
name = "customers"
business_key = ["email"]
"#;

pub async fn command(exe: std::path::PathBuf) -> anyhow::Result<()> {
    let binary = server_binary(true)?;
    println!(
        "starting production and staging servers ({})",
        binary.file_name().unwrap_or_default().to_string_lossy()
    );
    let prod_server = LocalServer::start(&binary, &[])?;
    let staging_server = LocalServer::start(&binary, &[])?;
    let prod_client = Client::with_uri_str(prod_server.uri()).await?;
    let staging_client = Client::with_uri_str(staging_server.uri()).await?;
    let prod: Collection<Document> = prod_client.database("shop").collection("orders");
    let staging: Collection<Document> =
        staging_client.database("shop_staging").collection("orders");

    let prod_customers: Collection<Document> = prod_client.database("shop").collection("customers");
    let staging_customers: Collection<Document> = staging_client
        .database("shop_staging")
        .collection("customers");
    let (ada, grace, linus) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
    prod_customers
        .insert_many(vec![
            doc! { "_id": ada, "email": "ada@example.org", "name": "Ada Lovelace" },
            doc! { "_id": grace, "email": "grace@example.org", "name": "Grace Hopper" },
            doc! { "_id": linus, "email": "linus@example.org", "name": "Linus Torvalds" },
        ])
        .await?;
    // Staging already has Ada's customer record, under its own _id: she is adopted by email.
    staging_customers
        .insert_one(doc! { "_id": "stg-cust-ada", "email": "ada@example.org", "name": "Ada (QA)", "qaNote": "test card on file" })
        .await?;
    prod.insert_many(vec![
        doc! { "userEmail": "ada@example.org", "accountId": 1, "total": 120, "status": "paid", "customerId": ada },
        doc! { "userEmail": "grace@example.org", "accountId": 2, "total": 75, "status": "paid", "customerId": grace },
        doc! { "userEmail": "linus@example.org", "accountId": 3, "total": 30, "status": "pending", "customerId": linus },
    ])
    .await?;
    // Staging already knows two of these customers, under its own _ids, with QA-only fields.
    staging
        .insert_many(vec![
            doc! { "_id": "stg-ada", "userEmail": "ada@example.org", "accountId": 1, "total": 0, "qaNote": "VIP test account", "experiments": { "newCheckout": true } },
            doc! { "_id": "stg-grace", "userEmail": "grace@example.org", "accountId": 2, "total": 0, "qaNote": "refund flow" },
            doc! { "_id": "stg-only", "userEmail": "qa-bot@example.org", "accountId": 99, "qaNote": "staging-only document" },
        ])
        .await?;
    println!("\nbefore the sync: production has 3 orders; staging has 2 of the same customers (own _ids, QA notes) and 1 staging-only document");
    show(&staging).await?;

    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("stagesync.toml");
    std::fs::write(&config_path, CONFIG)?;
    let log_path = dir.path().join("stagesync.log");
    let mut child = Command::new(&exe)
        .args(["run", "-c"])
        .arg(&config_path)
        .args(["--log-format", "text"])
        .env("PROD_URI", prod_server.uri())
        .env("STAGING_URI", staging_server.uri())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()
        .context("starting `stagesync run`")?;
    println!(
        "\n$ stagesync run -c stagesync.toml   (pid {}, log: {})",
        child.id(),
        log_path.display()
    );

    let result = async {
        step("initial snapshot: ada and grace adopted by business key (QA notes kept), linus inserted", &staging, || async {
            count(&staging, doc! { "_sync": { "$exists": true } }).await == 3
        })
        .await?;

        prod.insert_one(doc! { "userEmail": "margaret@example.org", "accountId": 4, "total": 200, "status": "paid" }).await?;
        step("production insert: margaret appears", &staging, || async {
            count(&staging, doc! { "userEmail": "margaret@example.org" }).await == 1
        })
        .await?;

        prod.update_one(doc! { "userEmail": "ada@example.org" }, doc! { "$set": { "status": "refunded", "total": 0 } }).await?;
        step("production update: ada refunded (her QA note and experiment flag stay)", &staging, || async {
            count(&staging, doc! { "userEmail": "ada@example.org", "status": "refunded" }).await == 1
        })
        .await?;

        prod.update_one(doc! { "userEmail": "linus@example.org" }, doc! { "$set": { "userEmail": "torvalds@example.org" } }).await?;
        step("business key change: linus → torvalds moves the same staging document", &staging, || async {
            count(&staging, doc! { "userEmail": "torvalds@example.org" }).await == 1
        })
        .await?;

        prod.delete_one(doc! { "userEmail": "grace@example.org" }).await?;
        step("production delete: grace is soft-deleted in staging, her QA note kept", &staging, || async {
            count(&staging, doc! { "userEmail": "grace@example.org", "deleted": true }).await == 1
        })
        .await?;

        // References: Ada's customer record was adopted under staging's _id "stg-cust-ada";
        // grace's and linus's were inserted under their production _ids. A new order of Ada's
        // arrives with her production _id, and is written with her staging _id.
        prod.insert_one(doc! { "userEmail": "ada@example.org", "accountId": 5, "total": 60, "status": "paid", "customerId": ada }).await?;
        step("references: a new order of ada's (customerId rewritten to her staging _id)", &staging, || async {
            count(&staging, doc! { "accountId": 5, "customerId": "stg-cust-ada" }).await == 1
        })
        .await?;
        lookup(&staging).await?;
        anyhow::Ok(())
    }
    .await;

    // Stop like an operator would: SIGTERM, then expect exit code 0 within 10 s.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Close the clients before the runtime ends (a driver left to its teardown can panic).
    prod_client.shutdown().immediate(true).await;
    staging_client.shutdown().immediate(true).await;
    if let Err(e) = result {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        bail!("demo failed: {e:#}\n--- stagesync log ---\n{log}");
    }
    match status {
        Some(s) if s.success() => {
            println!("\nstagesync run stopped cleanly on SIGTERM; servers stopped. Demo complete.")
        }
        Some(s) => bail!("stagesync run exited with {s} on SIGTERM"),
        None => bail!("stagesync run did not stop within 10 s of SIGTERM"),
    }
    Ok(())
}

/// `db.orders.aggregate([{$lookup: {from: "customers", localField: "customerId",
/// foreignField: "_id", as: "c"}}])` in staging: every order finds its customer.
async fn lookup(staging: &Collection<Document>) -> anyhow::Result<()> {
    let started = Instant::now();
    let rows = loop {
        let rows: Vec<Document> = staging
            .aggregate(vec![
                doc! { "$lookup": { "from": "customers", "localField": "customerId", "foreignField": "_id", "as": "c" } },
                doc! { "$sort": { "accountId": 1 } },
            ])
            .await?
            .try_collect()
            .await?;
        let all_found = rows
            .iter()
            .filter(|r| r.contains_key("customerId"))
            .all(|r| r.get_array("c").is_ok_and(|c| c.len() == 1));
        // (A customer copied after its orders is fixed up as it arrives: give it a moment.)
        if all_found || started.elapsed() > Duration::from_secs(30) {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("\n$ db.orders.aggregate([{{$lookup: {{from: \"customers\", localField: \"customerId\", foreignField: \"_id\", as: \"c\"}}}}])   (in staging)");
    println!(
        "  {:<22} {:>4} {:<14} customer found",
        "userEmail", "acct", "customerId"
    );
    let mut missing = 0;
    for r in &rows {
        let customer = r
            .get_array("c")
            .ok()
            .and_then(|c| c.first())
            .and_then(Bson::as_document)
            .and_then(|c| c.get_str("name").ok().map(String::from));
        if customer.is_none() && r.contains_key("customerId") {
            missing += 1;
        }
        let id = match r.get("customerId") {
            Some(Bson::ObjectId(o)) => format!("…{}", &o.to_hex()[18..]),
            Some(Bson::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => "-".into(),
        };
        println!(
            "  {:<22} {:>4} {:<14} {}",
            r.get_str("userEmail").unwrap_or("-"),
            r.get("accountId")
                .map(|v| v.to_string())
                .unwrap_or_default(),
            id,
            match (&customer, r.contains_key("customerId")) {
                (Some(name), _) => name.as_str(),
                (None, true) => "NOT FOUND",
                (None, false) => "- (no customerId)",
            }
        );
    }
    if missing > 0 {
        bail!("{missing} staging orders do not find their customer by $lookup");
    }
    Ok(())
}

async fn count(coll: &Collection<Document>, filter: Document) -> u64 {
    coll.count_documents(filter).await.unwrap_or(0)
}

/// Waits (up to 30 s) for `done`, then prints staging under `title`.
async fn step<F, Fut>(title: &str, staging: &Collection<Document>, done: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !done().await {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("staging did not reach the expected state: {title}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "\n▶ {title}  (in staging after {} ms)",
        started.elapsed().as_millis()
    );
    show(staging).await
}

async fn show(staging: &Collection<Document>) -> anyhow::Result<()> {
    let docs: Vec<Document> = staging
        .find(doc! {})
        .sort(doc! { "accountId": 1 })
        .await?
        .try_collect()
        .await?;
    println!(
        "  {:<10} {:<22} {:>4} {:>6} {:<9} {:<24} {:<8}",
        "_id", "userEmail", "acct", "total", "status", "qaNote", "deleted"
    );
    for d in docs {
        let text = |k: &str| match d.get(k) {
            Some(Bson::String(s)) => s.clone(),
            Some(Bson::Null) | None => "-".into(),
            Some(v) => v.to_string(),
        };
        let id = match d.get("_id") {
            Some(Bson::ObjectId(o)) => format!("…{}", &o.to_hex()[18..]),
            Some(Bson::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => "-".into(),
        };
        println!(
            "  {:<10} {:<22} {:>4} {:>6} {:<9} {:<24} {:<8}",
            id,
            text("userEmail"),
            text("accountId"),
            text("total"),
            text("status"),
            text("qaNote"),
            text("deleted")
        );
    }
    Ok(())
}
