//! An RD Station Marketing account on a random port, with an access token.

use reqwest::{Client, StatusCode};
use sandbox::Counters;
use sandbox::faults::Faults;
use sandbox::rdstation::{RdConfig, RdStationApp};
use serde_json::{Value, json};

pub struct Rd {
    pub base: String,
    pub app: RdStationApp,
    pub http: Client,
    pub token: String,
}

impl Rd {
    pub async fn start(config: RdConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = RdStationApp::new(config, Faults::default(), Counters::default());
        let router = app.clone().router();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        let http = Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let code = app.sim.lock().unwrap().issue_code();
        let tokens: Value = http
            .post(format!("{base}/auth/token?token_by=code"))
            .json(&json!({"client_id": "elo-rd-client", "client_secret": "elo-rd-secret", "code": code}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = tokens["access_token"].as_str().unwrap().to_owned();
        Self { base, app, http, token }
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        let text = resp.text().await.unwrap();
        (status, headers, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() })
    }
}
