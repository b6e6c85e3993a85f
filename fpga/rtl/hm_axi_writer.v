// hm_axi_writer: writes the stream of output beats contiguously from `addr` through an AXI4
// write master. A burst (up to MAX_BURST beats, never across a 4 KB boundary) is issued once
// its beats are buffered, or at the end (`last`) with whatever is left; the final beat's
// strobes cover only its items. `idle` once every beat is written and acknowledged.
`default_nettype none

module hm_axi_writer #(
    parameter ADDR_W    = 64,
    parameter DEPTH     = 32,  // beats of buffering; a power of two >= MAX_BURST
    parameter MAX_BURST = 16
) (
    input  wire              clk,
    input  wire              rst,
    input  wire              start,  // pulse: a new call writing from addr
    input  wire [ADDR_W-1:0] addr,   // 64-byte aligned
    input  wire              last,   // no more beats will come
    output wire              idle,
    output reg               berr,   // sticky: a write came back with an error response

    input  wire [511:0] in_data,
    input  wire [  4:0] in_items,  // 1..16 uint32 items in the beat
    input  wire         in_valid,
    output wire         in_ready,

    output reg  [ADDR_W-1:0] m_awaddr,
    output reg  [       7:0] m_awlen,
    output wire [       2:0] m_awsize,
    output wire [       1:0] m_awburst,
    output wire [       0:0] m_awid,
    output reg               m_awvalid,
    input  wire              m_awready,
    output wire [     511:0] m_wdata,
    output wire [      63:0] m_wstrb,
    output wire              m_wlast,
    output wire              m_wvalid,
    input  wire              m_wready,
    input  wire [       1:0] m_bresp,
    input  wire [       0:0] m_bid,
    input  wire              m_bvalid,
    output wire              m_bready
);
    localparam CW = $clog2(DEPTH) + 1;

    assign m_awsize = 3'd6;
    assign m_awburst = 2'd1;
    assign m_awid = 1'b0;
    assign m_bready = 1'b1;

    wire [516:0] fifo_out;
    wire         fifo_valid;
    wire [CW-1:0] count;

    hm_fifo #(
        .WIDTH(517),
        .DEPTH(DEPTH)
    ) u_fifo (
        .clk(clk),
        .rst(rst),
        .clear(start),
        .in_valid(in_valid),
        .in_data({in_items, in_data}),
        .in_ready(in_ready),
        .out_valid(fifo_valid),
        .out_data(fifo_out),
        .out_ready(m_wvalid && m_wready),
        .count(count)
    );

    reg  [ADDR_W-1:0] next_addr;
    reg  [       8:0] w_left;  // beats of the current burst still to send
    reg  [      15:0] bursts;  // bursts awaiting their response

    wire [       6:0] to_boundary = 7'd64 - {1'b0, next_addr[11:6]};
    wire [       8:0] cap = (to_boundary < MAX_BURST) ? {2'd0, to_boundary} : MAX_BURST;
    wire [       8:0] avail = {{(9 - CW) {1'b0}}, count};
    wire [       8:0] len = (avail < cap) ? avail : cap;
    wire              issue = w_left == 0 && !m_awvalid && avail != 0 && (avail >= cap || last);
    wire [       4:0] items = fifo_out[516:512];

    assign m_wdata = fifo_out[511:0];
    assign m_wstrb = (items == 5'd16) ? {64{1'b1}} : ~({64{1'b1}} << {items[3:0], 2'd0});
    assign m_wvalid = w_left != 0 && fifo_valid;
    assign m_wlast = w_left == 9'd1;
    assign idle = count == 0 && w_left == 0 && !m_awvalid && bursts == 0;

    wire bdone = m_bvalid;

    always @(posedge clk) begin
        if (rst) begin
            m_awvalid <= 1'b0;
            w_left    <= 0;
            bursts    <= 0;
            berr      <= 1'b0;
        end else if (start) begin
            next_addr <= {addr[ADDR_W-1:6], 6'd0};
            berr      <= 1'b0;
        end else begin
            if (m_awvalid && m_awready) m_awvalid <= 1'b0;
            if (issue) begin
                m_awaddr  <= next_addr;
                m_awlen   <= len[7:0] - 8'd1;
                m_awvalid <= 1'b1;
                next_addr <= next_addr + {len, 6'd0};
                w_left    <= len;
            end else if (m_wvalid && m_wready) begin
                w_left <= w_left - 1'b1;
            end
            bursts <= bursts + (issue ? 16'd1 : 16'd0) - (bdone ? 16'd1 : 16'd0);
            if (bdone && m_bresp != 2'd0) berr <= 1'b1;
        end
    end
endmodule

`default_nettype wire
