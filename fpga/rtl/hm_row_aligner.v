// hm_row_aligner: turns a stream of 512-bit beats holding packed rows of `row_bytes` bytes
// (starting `skip` bytes into the first beat) into row-aligned chunks: each row becomes
// ceil(row_bytes / 64) chunks, byte 0 of the row at bit 0 of its first chunk, the tail of the
// last chunk zero. So the lanes see rows of any width, and 64-byte rows pass at one per cycle.
`default_nettype none

module hm_row_aligner (
    input  wire         clk,
    input  wire         rst,
    input  wire         start,      // pulse: begin a stream
    input  wire [  5:0] skip,       // bytes to drop from the first beat (taken at start)
    input  wire [ 15:0] row_bytes,  // >= 1 (taken at start)
    input  wire [ 31:0] rows,
    output wire         done,       // every row emitted

    input  wire [511:0] in_data,
    input  wire         in_valid,
    output wire         in_ready,

    output wire [511:0] out_data,
    output wire         out_valid,
    input  wire         out_ready,
    output wire         out_first,  // the first chunk of a row
    output wire         out_last    // the last chunk of a row
);
    reg  [1023:0] buffer;  // bytes [0, fill) are valid, the rest zero
    reg  [   7:0] fill;
    reg           first_beat;
    reg  [  31:0] rows_left;
    reg  [  15:0] row_rem;  // bytes of the current row not yet emitted
    reg  [  15:0] rbytes;  // row_bytes of this stream
    reg  [   5:0] rskip;  // skip of this stream

    wire [   6:0] out_len = (row_rem > 16'd64) ? 7'd64 : row_rem[6:0];
    wire [ 511:0] keep = {512{1'b1}} >> {7'd64 - out_len, 3'd0};

    assign done = rows_left == 0;
    assign out_valid = !done && {1'b0, fill} >= {2'b0, out_len};
    assign out_data = buffer[511:0] & keep;
    assign out_first = row_rem == rbytes;
    assign out_last = row_rem <= 16'd64;
    assign in_ready = fill <= 8'd64;

    wire          fire_out = out_valid && out_ready;
    wire          fire_in = in_valid && in_ready;
    wire [   7:0] fill1 = fill - (fire_out ? {1'b0, out_len} : 8'd0);
    wire [1023:0] buf1 = fire_out ? (buffer >> {out_len, 3'd0}) : buffer;
    wire [   6:0] in_len = first_beat ? (7'd64 - {1'b0, rskip}) : 7'd64;
    wire [ 511:0] in_shifted = first_beat ? (in_data >> {rskip, 3'd0}) : in_data;
    wire [1023:0] appended = {512'd0, in_shifted} << {fill1, 3'd0};

    always @(posedge clk) begin
        if (rst) begin
            rows_left <= 0;
            fill      <= 0;
            buffer    <= 0;
        end else if (start) begin
            rows_left  <= rows;
            row_rem    <= row_bytes;
            rbytes     <= row_bytes;
            rskip      <= skip;
            fill       <= 0;
            buffer     <= 0;
            first_beat <= 1'b1;
        end else begin
            buffer <= fire_in ? (buf1 | appended) : buf1;
            fill   <= fill1 + (fire_in ? {1'b0, in_len} : 8'd0);
            if (fire_in) first_beat <= 1'b0;
            if (fire_out) begin
                if (out_last) begin
                    rows_left <= rows_left - 1;
                    row_rem   <= rbytes;
                end else begin
                    row_rem <= row_rem - 16'd64;
                end
            end
        end
    end
endmodule

`default_nettype wire
