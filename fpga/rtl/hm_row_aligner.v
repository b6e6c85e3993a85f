// hm_row_aligner: turns a stream of 512-bit beats holding packed rows of `row_bytes` bytes
// (starting `skip` bytes into the first beat) into row-aligned chunks: each row becomes
// ceil(row_bytes / 64) chunks, byte 0 of the row at bit 0 of its first chunk, the tail of the
// last chunk zero. So the lanes see rows of any width, and 64-byte rows pass at one per cycle.
//
// It holds up to three beats (b0 the oldest) and a byte offset `off` into b0 where the next
// chunk starts. A chunk is bytes [off, off + len) of {b1, b0}: a funnel shift by whole bytes,
// written as six constant-shift stages (about 3.5k 2:1 selects), then the tail masked. When a
// chunk reaches past b0, b0 is dropped and the beats move down; a new beat is taken while
// fewer than three are held, so a chunk and a beat can pass in the same cycle.
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
    reg [511:0] b0, b1, b2;
    reg [  1:0] nb;  // beats held
    reg [  5:0] off;  // byte of b0 where the next chunk starts
    reg [ 31:0] rows_left;
    reg [ 15:0] row_rem;  // bytes of the current row not yet emitted
    reg [ 15:0] rbytes;  // row_bytes of this stream

    wire [6:0] len = (row_rem > 16'd64) ? 7'd64 : row_rem[6:0];
    wire [7:0] end_byte = {2'b0, off} + {1'b0, len};  // one past the chunk's last byte, in b0
    wire spans = end_byte > 8'd64;  // the chunk needs b1 too
    wire pops = end_byte >= 8'd64;  // b0 is used up after it

    assign done = rows_left == 0;
    assign out_valid = !done && nb != 2'd0 && (!spans || nb >= 2'd2);
    assign out_first = row_rem == rbytes;
    assign out_last = row_rem <= 16'd64;
    assign in_ready = nb != 2'd3;

    // funnel shift: bytes [off, off + 64) of {b1, b0}, largest stage first, each stage only
    // as wide as the stages after it need
    // (one process, out_data written once per evaluation: an event-driven simulator then
    // wakes the lanes once, not once per byte)
    reg [1023:0] fs;
    reg [ 511:0] cut, chunk;
    integer m, j;
    always @(*) begin
        fs = {b1, b0};
        for (m = 5; m >= 0; m = m - 1) if (off[m]) fs = fs >> (8 << m);
        cut = fs[511:0];
        for (j = 0; j < 64; j = j + 1) if (j >= len) cut[8*j+:8] = 8'd0;
        chunk = cut;
    end
    assign out_data = chunk;

    wire fire_out = out_valid && out_ready;
    wire fire_in = in_valid && in_ready;
    wire pop = fire_out && pops;
    wire [1:0] base = nb - {1'b0, pop};  // where a new beat goes

    always @(posedge clk) begin
        if (rst) begin
            rows_left <= 0;
            nb        <= 0;
        end else if (start) begin
            rows_left <= rows;
            row_rem   <= row_bytes;
            rbytes    <= row_bytes;
            off       <= skip;
            nb        <= 0;
        end else begin
            nb <= base + {1'b0, fire_in};
            if (fire_out) begin
                off <= end_byte[5:0];
                if (out_last) begin
                    rows_left <= rows_left - 1;
                    row_rem   <= rbytes;
                end else begin
                    row_rem <= row_rem - 16'd64;
                end
            end
        end
        // the beats: move down on a pop, the new one behind the held ones
        b0 <= (fire_in && base == 2'd0) ? in_data : pop ? b1 : b0;
        b1 <= (fire_in && base == 2'd1) ? in_data : pop ? b2 : b1;
        b2 <= (fire_in && base == 2'd2) ? in_data : b2;
    end
endmodule

`default_nettype wire
