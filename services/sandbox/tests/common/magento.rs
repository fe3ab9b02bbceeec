//! A Magento store on a random port, with an admin token.

use reqwest::{Client, StatusCode};
use sandbox::Counters;
use sandbox::faults::Faults;
use sandbox::magento::generator::GeneratorConfig;
use sandbox::magento::{MagentoApp, MagentoConfig};
use serde_json::{Value, json};

pub struct Shop {
    pub base: String,
    pub app: MagentoApp,
    pub http: Client,
    pub token: String,
}

impl Shop {
    pub async fn start(config: MagentoConfig, orders: usize) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = MagentoApp::new(config, GeneratorConfig::default(), Faults::default(), Counters::default());
        app.sim.lock().unwrap().generate(orders);
        let router = app.clone().router();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        let http = Client::new();
        let token: Value = http
            .post(format!("{base}/rest/default/V1/integration/admin/token"))
            .json(&json!({"username": "admin", "password": "elo-sandbox-admin1"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        Self { base, app, http, token: token.as_str().expect("the admin token is a JSON string").to_owned() }
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(format!("{}/rest/default/V1{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json().await.unwrap())
    }
}
