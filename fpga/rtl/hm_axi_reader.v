// hm_axi_reader: streams a byte range of HBM through an AXI4 read master, one 512-bit beat per
// cycle. Bursts of up to MAX_BURST beats never cross a 4 KB boundary; several bursts stay
// outstanding, limited by credits (FIFO room not yet claimed), so R never needs backpressure and
// the port keeps streaming while the datapath consumes.
`default_nettype none

module hm_axi_reader #(
    parameter ADDR_W    = 64,
    parameter DEPTH     = 128,  // beats of buffering; a power of two >= 2 * MAX_BURST
    parameter MAX_BURST = 64    // beats per burst; 64 beats of 64 B is the AXI 4 KB limit
) (
    input  wire              clk,
    input  wire              rst,
    input  wire              start,  // pulse: begin a stream (the previous one is finished)
    input  wire [ADDR_W-1:0] addr,   // byte address of the first beat (low 6 bits ignored)
    input  wire [      31:0] beats,  // beats to read
    output wire              busy,
    output reg               rerr,   // sticky: a beat came back with an error response

    output reg  [ADDR_W-1:0] m_araddr,
    output reg  [       7:0] m_arlen,
    output wire [       2:0] m_arsize,
    output wire [       1:0] m_arburst,
    output wire [       0:0] m_arid,
    output reg               m_arvalid,
    input  wire              m_arready,
    input  wire [     511:0] m_rdata,
    input  wire [       1:0] m_rresp,
    input  wire              m_rlast,
    input  wire [       0:0] m_rid,
    input  wire              m_rvalid,
    output wire              m_rready,

    output wire [511:0] out_data,
    output wire         out_valid,
    input  wire         out_ready
);
    localparam CW = $clog2(DEPTH) + 1;

    assign m_arsize = 3'd6;  // 64-byte beats
    assign m_arburst = 2'd1;  // INCR
    assign m_arid = 1'b0;
    assign m_rready = 1'b1;  // credits guarantee FIFO room for every beat requested

    reg  [ADDR_W-1:0] next_addr;
    reg  [      31:0] remaining;  // beats not yet requested
    reg  [    CW-1:0] inflight;  // beats requested, not yet returned
    wire [    CW-1:0] count;

    wire [       6:0] to_boundary = 7'd64 - {1'b0, next_addr[11:6]};
    wire [      31:0] cap = (to_boundary < MAX_BURST) ? {25'd0, to_boundary} : MAX_BURST;
    wire [      31:0] len = (remaining < cap) ? remaining : cap;
    wire [      31:0] free = DEPTH - count - inflight;
    wire              issue = !m_arvalid && remaining != 0 && free >= len;
    wire              got = m_rvalid;

    assign busy = remaining != 0 || inflight != 0 || m_arvalid;

    always @(posedge clk) begin
        if (rst) begin
            m_arvalid <= 1'b0;
            remaining <= 0;
            inflight  <= 0;
            rerr      <= 1'b0;
        end else if (start) begin
            next_addr <= {addr[ADDR_W-1:6], 6'd0};
            remaining <= beats;
            rerr      <= 1'b0;
        end else begin
            if (m_arvalid && m_arready) m_arvalid <= 1'b0;
            if (issue) begin
                m_araddr  <= next_addr;
                m_arlen   <= len[7:0] - 8'd1;
                m_arvalid <= 1'b1;
                next_addr <= next_addr + {len, 6'd0};
                remaining <= remaining - len;
            end
            inflight <= inflight + (issue ? len[CW-1:0] : {CW{1'b0}}) - {{(CW - 1) {1'b0}}, got};
            if (got && m_rresp != 2'd0) rerr <= 1'b1;
        end
    end

    hm_fifo #(
        .WIDTH(512),
        .DEPTH(DEPTH)
    ) u_fifo (
        .clk(clk),
        .rst(rst),
        .clear(start),
        .in_valid(got),
        .in_data(m_rdata),
        .in_ready(),
        .out_valid(out_valid),
        .out_data(out_data),
        .out_ready(out_ready),
        .count(count)
    );
endmodule

`default_nettype wire
