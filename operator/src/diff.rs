//! "Is the observed object already what we would apply?" The API server adds defaults and
//! fields owned by others, so an object is converged when every field we set has the same
//! value in the observed object (`desired` is a subset of `observed`). Compare first, write
//! only on a difference: an idle resync then makes no API call.

use serde_json::Value;

/// True when every value in `desired` is present and equal in `observed`. Objects may have
/// extra keys in `observed`; arrays must have the same length and match element by element.
pub fn is_subset(desired: &Value, observed: &Value) -> bool {
    match (desired, observed) {
        (Value::Object(d), Value::Object(o)) => d.iter().all(|(k, dv)| match o.get(k) {
            Some(ov) => is_subset(dv, ov),
            // An empty object or array we set may be dropped by the server.
            None => is_empty(dv),
        }),
        (Value::Array(d), Value::Array(o)) => {
            d.len() == o.len() && d.iter().zip(o).all(|(dv, ov)| is_subset(dv, ov))
        }
        (Value::Null, _) => true,
        (d, o) => d == o,
    }
}

/// The path of the first value in `desired` that `observed` lacks or holds differently
/// (None when [`is_subset`] holds), e.g. `spec.template.spec.volumes[4].readOnly`. For logs
/// and tests: it names what made a comparison fail.
pub fn first_difference(desired: &Value, observed: &Value) -> Option<String> {
    fn walk(d: &Value, o: Option<&Value>, path: &mut Vec<String>) -> Option<String> {
        let here = |path: &[String]| path.concat().trim_start_matches('.').to_owned();
        match (d, o) {
            (Value::Null, _) => None,
            (d, None) if is_empty(d) => None,
            (_, None) => Some(here(path)),
            (Value::Object(dm), Some(Value::Object(om))) => dm.iter().find_map(|(k, dv)| {
                path.push(format!(".{k}"));
                let found = walk(dv, om.get(k), path);
                path.pop();
                found
            }),
            (Value::Array(da), Some(Value::Array(oa))) if da.len() == oa.len() => {
                da.iter().zip(oa).enumerate().find_map(|(i, (dv, ov))| {
                    path.push(format!("[{i}]"));
                    let found = walk(dv, Some(ov), path);
                    path.pop();
                    found
                })
            }
            (d, Some(o)) if d == o => None,
            _ => Some(here(path)),
        }
    }
    walk(desired, Some(observed), &mut vec![])
}

/// True when `a` and `b` hold the same values at every path `shape` has (its leaves'
/// values are ignored): whether two versions of an object agree on the fields we set.
pub fn agree_on(shape: &Value, a: &Value, b: &Value) -> bool {
    match shape {
        Value::Object(keys) => keys.iter().all(|(k, sub)| match (a.get(k), b.get(k)) {
            (None, None) => true,
            (Some(x), Some(y)) => agree_on(sub, x, y),
            _ => false,
        }),
        Value::Array(items) => match (a, b) {
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() && items.len() == x.len() => {
                items
                    .iter()
                    .zip(x.iter().zip(y))
                    .all(|(s, (x, y))| agree_on(s, x, y))
            }
            _ => a == b,
        },
        _ => a == b,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extra_observed_fields_are_fine() {
        let d = json!({"spec": {"replicas": 1}, "metadata": {"labels": {"a": "1"}}});
        let o = json!({"spec": {"replicas": 1, "strategy": {}}, "metadata": {"labels": {"a": "1", "b": "2"}, "uid": "x"}});
        assert!(is_subset(&d, &o));
    }

    #[test]
    fn changed_or_missing_values_are_drift() {
        let d = json!({"spec": {"replicas": 1}});
        assert!(!is_subset(&d, &json!({"spec": {"replicas": 0}})));
        assert!(!is_subset(&d, &json!({"spec": {}})));
        assert!(!is_subset(&json!({"a": [1, 2]}), &json!({"a": [1]})));
        assert!(!is_subset(
            &json!({"a": [{"x": 1}]}),
            &json!({"a": [{"x": 2}]})
        ));
        assert!(is_subset(
            &json!({"a": [{"x": 1}]}),
            &json!({"a": [{"x": 1, "y": 2}]})
        ));
    }

    #[test]
    fn the_first_difference_is_named_by_its_path() {
        let d = json!({"spec": {"a": 1, "list": [{"x": 1}, {"readOnly": false}]}});
        assert_eq!(first_difference(&d, &d), None);
        let o = json!({"spec": {"a": 1, "list": [{"x": 1, "y": 0}, {}]}});
        assert_eq!(
            first_difference(&d, &o).as_deref(),
            Some("spec.list[1].readOnly")
        );
        assert!(!is_subset(&d, &o));
        let o = json!({"spec": {"a": 2}});
        assert_eq!(first_difference(&d, &o).as_deref(), Some("spec.a"));
    }

    #[test]
    fn versions_agree_on_the_fields_we_set_only() {
        let shape = json!({"metadata": {"labels": {"a": "x"}}, "spec": {"size": "1024Mi", "list": [{"n": 1}]}});
        let a = json!({"metadata": {"labels": {"a": "1"}, "annotations": {"rev": "1"}}, "spec": {"size": "1Gi", "list": [{"n": 1, "d": 0}]}});
        let mut b = a.clone();
        b["metadata"]["annotations"]["rev"] = json!("2");
        b["status"] = json!({"ready": true});
        assert!(agree_on(&shape, &a, &b));
        b["spec"]["size"] = json!("2Gi");
        assert!(!agree_on(&shape, &a, &b));
        let mut c = a.clone();
        c["spec"]["list"] = json!([{"n": 1, "d": 0}, {"n": 2}]);
        assert!(!agree_on(&shape, &a, &c));
        let mut d = a.clone();
        d["metadata"]["labels"] = json!({});
        assert!(!agree_on(&shape, &a, &d));
    }

    #[test]
    fn empty_desired_values_may_be_absent() {
        assert!(is_subset(&json!({"podSelector": {}}), &json!({})));
        assert!(!is_subset(&json!({"podSelector": {"a": 1}}), &json!({})));
    }
}
