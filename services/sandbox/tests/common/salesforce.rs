//! A Salesforce org on a random port, with its control API and a client-credentials token.

use reqwest::{Client, StatusCode};
use sandbox::faults::Faults;
use sandbox::salesforce::{SalesforceApp, SalesforceConfig};
use sandbox::{Counters, control};
use serde_json::Value;

pub struct Org {
    pub base: String,
    pub control: String,
    pub http: Client,
    pub token: String,
    pub app: SalesforceApp,
}

impl Org {
    pub async fn start(config: SalesforceConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = SalesforceApp::new(
            SalesforceConfig { instance_url: base.clone(), ..config },
            Faults::default(),
            Counters::default(),
        );
        let ctl = control::router(control::Control {
            faults: app.faults.clone(),
            counters: app.counters.clone(),
            salesforce: app.clone(),
            rdstation: sandbox::rdstation::RdStationApp::new(
                Default::default(),
                app.faults.clone(),
                app.counters.clone(),
            ),
            magento: sandbox::magento::MagentoApp::new(
                Default::default(),
                Default::default(),
                app.faults.clone(),
                app.counters.clone(),
            ),
        });
        let router = app.clone().router();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        let ctl_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let control = format!("http://{}", ctl_listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(ctl_listener, ctl).await.unwrap() });
        let http = Client::new();
        let token = http
            .post(format!("{base}/services/oauth2/token"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "elo-sandbox-client"),
                ("client_secret", "elo-sandbox-secret"),
            ])
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        Self { base, control, http, token, app }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req =
            self.http.request(method, format!("{}/services/data/v66.0{path}", self.base)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        let text = resp.text().await.unwrap();
        (status, headers, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() })
    }

    pub async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let (s, _, b) = self.call(reqwest::Method::PATCH, path, Some(body)).await;
        (s, b)
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let (s, _, b) = self.call(reqwest::Method::POST, path, Some(body)).await;
        (s, b)
    }
}

pub fn error_code(body: &Value) -> &str {
    body[0]["errorCode"].as_str().unwrap_or_else(|| panic!("not a Salesforce error body: {body}"))
}
