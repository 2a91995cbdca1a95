//! One codec script call, as a decoder thread makes it: an Alibaba data-parsing script reading
//! an 8-byte property frame, and a Huawei codec reading a 4-byte meter frame into its JSON string,
//! each through the budget (deadline armed, result parsed back to JSON).
//!
//! `cargo bench --bench codec`

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nbhub::codec::Reading;
use nbhub::codec::script::{Budget, Script};

const ALIBABA: &str = include_str!("../codecs/alibaba-thermostat.js");

const HUAWEI: &str = r#"
function decode(payload, topic) {
    return JSON.stringify({ msgType: 'deviceReq', hasMore: 0, data: [{ serviceId: 'WaterMeter',
        serviceData: { reading: (payload[1] << 8) | payload[2], battery: payload[3] } }] });
}
"#;

fn budget() -> Budget {
    Budget { call_timeout: Duration::from_millis(50), memory_bytes: 16 << 20, stack_bytes: 256 << 10 }
}

fn calls(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    let mut alibaba = Script::compile(ALIBABA, budget()).unwrap();
    let frame = [0x00, 0, 0, 0, 7, 0x00, 0xeb, 0x01];
    group.bench_function("alibaba_rawDataToProtocol", |b| {
        b.iter(|| alibaba.read(Reading::Raw, "/sys/p/d/thing/model/up_raw", &frame).unwrap())
    });
    let mut huawei = Script::compile(HUAWEI, budget()).unwrap();
    group.bench_function("huawei_decode", |b| b.iter(|| huawei.read(Reading::Raw, "/t/d", &[0, 1, 2, 90]).unwrap()));
    group.bench_function("compile", |b| b.iter(|| Script::compile(ALIBABA, budget()).unwrap()));
    group.finish();
}

criterion_group!(benches, calls);
criterion_main!(benches);
