// An Alibaba data-parsing script in the style of Alibaba's "data parsing" documentation
// (seed 002 §9): a one-byte frame type, then big-endian fields, read through a DataView of the
// masked signed bytes. Frame 0x00 reports properties (int32 id, int16 temperature in tenths,
// uint8 switch) as thing.event.property.post; a property set goes down as frame 0x01 (int32 id,
// uint8 switch) and its result comes back on down_raw_reply as frame 0x03 (int32 id, uint8 code).
var COMMAND_REPORT = 0x00;
var COMMAND_SET = 0x01;
var COMMAND_SET_REPLY = 0x03;
var ALINK_PROP_REPORT_METHOD = 'thing.event.property.post';
var ALINK_PROP_SET_METHOD = 'thing.service.property.set';

function rawDataToProtocol(bytes) {
    var uint8Array = new Uint8Array(bytes.length);
    for (var i = 0; i < bytes.length; i++) {
        uint8Array[i] = bytes[i] & 0xff;
    }
    var dataView = new DataView(uint8Array.buffer, 0);
    var jsonMap = new Object();
    if (uint8Array[0] == COMMAND_REPORT) {
        jsonMap['method'] = ALINK_PROP_REPORT_METHOD;
        jsonMap['version'] = '1.0';
        jsonMap['id'] = '' + dataView.getInt32(1);
        var params = {};
        params['temperature'] = dataView.getInt16(5) / 10;
        params['switch'] = uint8Array[7];
        jsonMap['params'] = params;
    } else if (uint8Array[0] == COMMAND_SET_REPLY) {
        jsonMap['version'] = '1.0';
        jsonMap['id'] = '' + dataView.getInt32(1);
        jsonMap['code'] = '' + dataView.getUint8(5);
        jsonMap['data'] = {};
    }
    return jsonMap;
}

function protocolToRawData(json) {
    var payloadArray = [COMMAND_SET];
    var id = parseInt(json['id']);
    payloadArray = payloadArray.concat([(id >> 24) & 0xff, (id >> 16) & 0xff, (id >> 8) & 0xff, id & 0xff]);
    payloadArray.push(json['params']['switch']);
    return payloadArray;
}
