//! The `kafka` tables: librdkafka properties passed through as they are
//! ([`KafkaProperties`]), and the ones that cannot be.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::SettingsError;

/// Properties that have their own setting, or that would break the library's
/// promise, and so cannot be passed through.
const RESERVED: &[(&str, &str)] = &[
    ("bootstrap.servers", "use the `bootstrap_servers` setting"),
    ("group.id", "use `consumer.group_id`"),
    (
        "enable.auto.commit",
        "kafka-batch commits a batch's offsets only after the handler returns Ok; auto commit would commit records that were never handled. Remove it (set `consumer.commit = false` to commit yourself)",
    ),
    (
        "enable.auto.offset.store",
        "kafka-batch commits explicit offsets; remove it",
    ),
    (
        "auto.commit.interval.ms",
        "use `consumer.commit_interval_ms` (librdkafka commits on it only the offsets kafka-batch stored as settled)",
    ),
];

/// librdkafka properties passed through as they are (`"fetch.max.bytes" = 1048576`).
///
/// Names are normalised: `_` becomes `.`, so that an environment variable
/// (which cannot hold a dot) can name any property. Values may be strings,
/// numbers or booleans.
///
/// ```
/// use kafka_batch::settings::KafkaProperties;
///
/// let mut props = KafkaProperties::default();
/// props.set("fetch_max_bytes", "2097152"); // as an environment variable writes it
/// assert_eq!(props.get("fetch.max.bytes"), Some("2097152"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KafkaProperties(BTreeMap<String, String>);

impl KafkaProperties {
    /// Sets a property.
    pub fn set(&mut self, name: &str, value: impl Into<String>) -> &mut Self {
        self.0.insert(normalise(name), value.into());
        self
    }

    /// The value of a property, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(&normalise(name)).map(String::as_str)
    }

    /// Every property, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The properties as `name=value` pairs for a log line, with the value
    /// of every property that may hold a secret (a password, a key, a
    /// token, an OAuth secret or config) replaced by `<redacted>`.
    ///
    /// ```
    /// use kafka_batch::settings::KafkaProperties;
    ///
    /// let mut props = KafkaProperties::default();
    /// props.set("sasl.password", "hunter2").set("fetch.min.bytes", "1");
    /// assert_eq!(props.redacted(), "fetch.min.bytes=1 sasl.password=<redacted>");
    /// ```
    pub fn redacted(&self) -> String {
        const SECRET: &[&str] = &[
            "password",
            "secret",
            "key.pem",
            "token",
            "oauthbearer.config",
            "jaas",
        ];
        self.0
            .iter()
            .map(|(k, v)| {
                if SECRET.iter().any(|s| k.contains(s)) {
                    format!("{k}=<redacted>")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub(super) fn overlaid_by(&self, over: &KafkaProperties) -> KafkaProperties {
        let mut merged = self.0.clone();
        merged.extend(over.0.iter().map(|(k, v)| (k.clone(), v.clone())));
        KafkaProperties(merged)
    }

    pub(super) fn check_reserved(&self, table: &str) -> Result<(), SettingsError> {
        for (name, why) in RESERVED {
            if let Some(value) = self.0.get(*name) {
                if *name == "enable.auto.commit" && value == "false" {
                    continue;
                }
                return Err(SettingsError::invalid(
                    format!("{table}.\"{name}\""),
                    format!("= {value:?} cannot be passed through"),
                    *why,
                ));
            }
        }
        Ok(())
    }
}

fn normalise(name: &str) -> String {
    name.trim().replace('_', ".")
}

impl<'de> Deserialize<'de> for KafkaProperties {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PropertiesVisitor;
        impl<'de> Visitor<'de> for PropertiesVisitor {
            type Value = KafkaProperties;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of librdkafka properties (name = value)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut props = KafkaProperties::default();
                while let Some(name) = map.next_key::<String>()? {
                    let value = map.next_value::<Scalar>()?;
                    props.set(&name, value.0);
                }
                Ok(props)
            }
        }
        d.deserialize_map(PropertiesVisitor)
    }
}

/// A property value: text, number or boolean, kept as librdkafka's text.
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_char<E: de::Error>(self, v: char) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(ScalarVisitor)
    }
}
